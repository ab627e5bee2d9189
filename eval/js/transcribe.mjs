// transformers.js's automatic-speech-recognition pipeline on a local export in the hf layout.
//
//   node transcribe.mjs EXPORT_DIR DTYPE THREADS [--language=CODE] [CLIP.f32 ...]
//
// EXPORT_DIR: a folder written by `./launch.sh export MODEL OUT --format hf`. DTYPE: fp32 (onnx/*_model.onnx)
// or q8 (onnx/*_model_quantized.onnx). --language: a multilingual model's language (default: its
// generation_config's). Each CLIP.f32 holds 16 kHz mono float32 little-endian samples.
// Prints one JSON line per clip, {"clip", "text", "seconds"} (wall clock of the pipeline call). With no
// clips on the command line, clip paths are read from stdin, one per line, and answered as they come
// (the mode `eval.runtimes.TransformersJsEngine` keeps running). Nothing is fetched: remote models are off.
import { readFileSync } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { env, pipeline } from "@huggingface/transformers";

const [dir, dtype, threads, ...rest] = process.argv.slice(2);
const language = rest.find((a) => a.startsWith("--language="))?.slice("--language=".length);
const clips = rest.filter((a) => !a.startsWith("--language="));
const options = language ? { language, task: "transcribe" } : {};
if (!dir || !["fp32", "q8"].includes(dtype) || !(Number(threads) > 0)) {
  console.error("usage: node transcribe.mjs EXPORT_DIR fp32|q8 THREADS [--language=CODE] [CLIP.f32 ...]");
  process.exit(2);
}
env.allowRemoteModels = false;
env.localModelPath = dirname(resolve(dir));
const asr = await pipeline("automatic-speech-recognition", basename(resolve(dir)), {
  dtype,
  device: "cpu",
  session_options: { intraOpNumThreads: Number(threads), interOpNumThreads: 1 },
});

async function answer(clip) {
  const b = readFileSync(clip);
  const audio = new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
  const t = performance.now();
  const out = await asr(audio, options);
  return JSON.stringify({ clip, text: out.text, seconds: (performance.now() - t) / 1000 });
}

if (clips.length) {
  for (const clip of clips) console.log(await answer(clip));
} else {
  console.log(JSON.stringify({ ready: true }));
  for await (const line of createInterface({ input: process.stdin })) {
    if (line.trim()) console.log(await answer(line.trim()));
  }
}
