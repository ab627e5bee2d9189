"""The sherpa-onnx layout: what sherpa-onnx's Whisper recognizer (`OfflineRecognizer.from_whisper`) loads.

    encoder.int8.onnx   mel (N, n_mels, T), T dynamic (sherpa pads a clip with `tail_paddings` frames, at
                        most to 3000)
                        -> n_layer_cross_k, n_layer_cross_v (n_text_layer, N, T/2, W_cross)
    decoder.int8.onnx   tokens (N, n), in_n_layer_self_k_cache, in_n_layer_self_v_cache
                        (n_text_layer, N, n_text_ctx, W_self), n_layer_cross_k, n_layer_cross_v, offset (1,)
                        -> logits (N, n, n_vocab), out_n_layer_self_k_cache, out_n_layer_self_v_cache
    tokens.txt          one line per text token: base64 of its bytes, then its id
    metadata            on the encoder (where sherpa-onnx reads it): `n_mels`, `n_text_layer`, `n_text_ctx`,
                        `n_text_state` (= W_self), `n_vocab`, `sot`, `eot`, `blank_id`, `translate`,
                        `transcribe`, `is_multilingual`, `no_timestamps`, `no_speech`, `sot_sequence`, and for
                        multilingual models `all_language_tokens` / `all_language_codes`

sherpa-onnx stacks every decoder layer's keys/values into one tensor, so all layers share one width. A
pruned model keeps different head counts per layer; each layer's K/V are padded with zero heads to the
widest layer (W = max heads x head_dim; self and cross separately). That is exact: a layer reads only its
own heads' columns of the stacked tensors, and the padding is never multiplied by anything. What it costs
is memory and copying (docs/runtimes.md measures it).

The decoding rules the slim engine applies in Python are part of the decoder graph here, since sherpa-onnx's
greedy search takes the plain argmax: the suppress tokens always, the begin-suppress tokens on the first
call (offset 0, where the prompt is fed). With those, greedy tokens are the slim engine's on the same
features. The self-attention cache is written at [offset, offset + n) of the full n_text_ctx cache.

The arithmetic (float or the QDQ of the QAT scales) is `qat.onnx_export._Graph`'s, the slim graphs'. Keys
and values are put on their int8 grid before they enter the caches (re-quantizing an on-grid value is exact),
so the QDQ pairs before each attention matmul are what ORT fuses into int8 kernels.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from qat.onnx_export import _NEG, _DecoderGraph, _EncoderGraph, _no_heads, _onnx_export

TOKENS = "tokens.txt"


def graph_files(mode: str) -> tuple[str, str]:
    """(encoder, decoder) file names: sherpa-onnx's `.int8` names for the INT8 modes."""
    tag = "" if mode == "float" else ".int8"
    return f"encoder{tag}.onnx", f"decoder{tag}.onnx"


def _pad_heads(x, width: int):
    """(N, S, H*D) -> (N, S, width): zero columns for the heads this layer lacks (width = the widest layer's)."""
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def whisper_padding(mel):
    """sherpa-onnx's padding made Whisper's: frames whose every bin is 0.0 get the clip's max - 2.

    sherpa-onnx pads the normalized log-mel of a clip with frames of 0.0 (`tail_paddings`). Whisper pads the
    audio with silence instead, whose log-mel is clamped to the clip's max - 8 and so normalizes to the
    normalized max - 2 ((x + 4) / 4). A real frame is never 0.0 in all its bins, so this picks the padding.
    """
    pad = (mel == 0).all(dim=1, keepdim=True)
    top = mel.amax(dim=(1, 2), keepdim=True)
    return torch.where(pad, top - 2.0, mel)


class _SherpaEncoder(_EncoderGraph):
    def __init__(self, model, plan, cross_width: int):
        super().__init__(model, plan)
        self.layers = list(model.model.decoder.layers)
        self.width = cross_width

    def forward(self, mel):
        x = self.hidden(whisper_padding(mel))
        kv = iter(self.linears(x, [p for a in self.cross for p in (a.k_proj, a.v_proj)]))
        ks, vs = [], []
        for layer in self.layers:
            a = layer.encoder_attn
            if a.num_heads:
                k, v = self.kv_grid(a, next(kv), next(kv))  # per tensor: the (N, S, H*D) layout is as good
                ks.append(_pad_heads(k, self.width))
                vs.append(_pad_heads(v, self.width))
            else:
                z = torch.zeros_like(x[..., :1]).expand(-1, -1, self.width)
                ks.append(z)
                vs.append(z)
        return torch.stack(ks), torch.stack(vs)


class _SherpaDecoder(_DecoderGraph):
    def __init__(self, model, plan, self_width: int, suppress, begin_suppress):
        super().__init__(model, plan)
        self.self_width = self_width
        vocab = model.config.vocab_size
        bias = torch.zeros(vocab)
        bias[list(suppress)] = float("-inf")
        begin = torch.zeros(vocab)
        begin[list(begin_suppress)] = float("-inf")
        self.register_buffer("suppress_bias", bias)
        self.register_buffer("begin_bias", begin)

    def _heads(self, attn, x):
        """(N, S, W) stacked -> this layer's (N, H, S, D)."""
        return x[..., : attn.num_heads * attn.head_dim].reshape(
            x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    def forward(self, tokens, self_k, self_v, cross_k, cross_v, offset):
        d = self.decoder
        T = tokens.shape[1]
        start = offset[0]
        end = start + T
        pos = start + torch.arange(T, dtype=torch.int64)
        x = self.embed(tokens) + F.embedding(pos, d.embed_positions.weight)
        q_pos = torch.arange(T, dtype=torch.int64)[:, None] + start
        mask = torch.where(torch.arange(end, dtype=torch.int64)[None, :] > q_pos, _NEG, 0.0)
        new_k, new_v = [], []
        for i, layer in enumerate(d.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            kc, vc = self_k[i], self_v[i]
            if attn.num_heads == 0:
                x = x + _no_heads(attn, h)
            else:
                q, k, v = self.linears(h, [attn.q_proj, attn.k_proj, attn.v_proj])
                k, v = self.kv_grid(attn, k, v)
                kc = torch.cat([kc[:, :start], _pad_heads(k, self.self_width), kc[:, end:]], 1)
                vc = torch.cat([vc[:, :start], _pad_heads(v, self.self_width), vc[:, end:]], 1)
                keys = self._heads(attn, kc[:, :end]).transpose(2, 3)
                vals = self._heads(attn, vc[:, :end])
                keys, vals = self.kv_grid(attn, keys, vals)  # on-grid already: the DQ the int8 matmul needs
                x = x + self.merge(attn, self.attend(attn, self.split_q(attn, q), keys, vals, mask))
            new_k.append(kc)
            new_v.append(vc)
            attn = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            if attn.num_heads == 0:
                x = x + _no_heads(attn, h)
            else:
                keys = self._heads(attn, cross_k[i]).transpose(2, 3)
                vals = self._heads(attn, cross_v[i])
                keys, vals = self.kv_grid(attn, keys, vals)
                q = self.split_q(attn, self.linear(h, attn.q_proj))
                x = x + self.merge(attn, self.attend(attn, q, keys, vals))
            x = x + self.mlp(layer, layer.final_layer_norm(x))
        logits = self.logits(d.layer_norm(x)) + self.suppress_bias
        logits = logits + torch.where(offset == 0, self.begin_bias, torch.zeros_like(self.begin_bias))
        return logits, torch.stack(new_k), torch.stack(new_v)


def widths(model) -> tuple[int, int]:
    """(W_self, W_cross): the widest decoder layer's self- and cross-attention K/V (at least one head)."""
    layers = model.model.decoder.layers
    D = layers[0].self_attn.head_dim
    return (max(1, max(l.self_attn.num_heads for l in layers)) * D,
            max(1, max(l.encoder_attn.num_heads for l in layers)) * D)


def write_tokens(tokenizer_json: Path, out: Path) -> int:
    """tokens.txt from a byte-level BPE tokenizer.json: every non-special token as base64(bytes) and id."""
    tok = json.loads(Path(tokenizer_json).read_text())
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    # GPT-2's byte <-> printable character table, which byte-level BPE vocabularies are written in
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    to_byte = {chr(c): b for b, c in zip(printable, chars)}
    lines = []
    for text, i in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if i in special:
            continue
        try:
            raw = bytes(to_byte[c] for c in text)
        except KeyError:
            raise ValueError(f"{tokenizer_json}: token {i} {text!r} is not byte-level BPE") from None
        lines.append(f"{base64.b64encode(raw).decode()} {i}")
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def metadata(model, tokenizer_json: Path, decode, self_width: int) -> dict[str, str]:
    """The metadata sherpa-onnx's OfflineWhisperModel reads, from the model's configs and tokenizer."""
    cfg, gc = model.config, model.generation_config
    tok = json.loads(Path(tokenizer_json).read_text())
    ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}

    def token(*names):
        for n in names:
            if n in ids:
                return ids[n]
        raise ValueError(f"{tokenizer_json}: has none of {names}")

    multilingual = bool(getattr(gc, "is_multilingual", False))
    prompt = list(decode.prompt)
    no_ts = token("<|notimestamps|>")
    sot_sequence = prompt[:-1] if prompt and prompt[-1] == no_ts else prompt  # sherpa appends no_timestamps
    blank = tok["model"]["vocab"].get("Ġ")
    if blank is None:
        raise ValueError(f"{tokenizer_json}: has no token for a single space")
    meta = {
        "model_type": "whisper-slim", "version": "1",
        "n_mels": cfg.num_mel_bins, "n_audio_ctx": cfg.max_source_positions, "n_vocab": cfg.vocab_size,
        "n_text_layer": cfg.decoder_layers, "n_text_ctx": cfg.max_target_positions, "n_text_state": self_width,
        "sot": token("<|startoftranscript|>"), "eot": decode.eos_token_id, "blank_id": blank,
        "translate": token("<|translate|>"), "transcribe": token("<|transcribe|>"),
        "no_timestamps": no_ts, "no_speech": token("<|nospeech|>", "<|nocaptions|>"),
        "is_multilingual": int(multilingual), "sot_sequence": ",".join(map(str, sot_sequence)),
    }
    if multilingual:
        langs = sorted(gc.lang_to_id.items(), key=lambda kv: kv[1])
        meta["all_language_tokens"] = ",".join(str(i) for _, i in langs)
        meta["all_language_codes"] = ",".join(k.strip("<|>") for k, _ in langs)
    return {k: str(v) for k, v in meta.items()}


def export_graphs(model, plan, decode, tokenizer_json: Path, tmp: Path, opset: int, mode: str) -> dict:
    """Write the sherpa-onnx files into `tmp`; returns what export_config.json records of them."""
    ENCODER, DECODER = graph_files(mode)
    w_self, w_cross = widths(model)
    cfg = model.config
    enc = _SherpaEncoder(model, plan, w_cross).eval()
    dec = _SherpaDecoder(model, plan, w_self, decode.suppress_tokens, decode.begin_suppress_tokens).eval()
    L, frames = cfg.decoder_layers, 2 * cfg.max_source_positions
    mel = torch.zeros(1, cfg.num_mel_bins, frames)
    _onnx_export(enc, (mel,), tmp / ENCODER, ["mel"], ["n_layer_cross_k", "n_layer_cross_v"],
                 {"mel": {0: "n_audio", 2: "T"}, "n_layer_cross_k": {1: "n_audio", 2: "T"},
                  "n_layer_cross_v": {1: "n_audio", 2: "T"}}, opset)
    ctx = cfg.max_target_positions
    S = cfg.max_source_positions
    args = (torch.full((1, 3), int(decode.prompt[0]), dtype=torch.int64),
            torch.zeros(L, 1, ctx, w_self), torch.zeros(L, 1, ctx, w_self),
            torch.zeros(L, 1, S, w_cross), torch.zeros(L, 1, S, w_cross), torch.tensor([2], dtype=torch.int64))
    ins = ["tokens", "in_n_layer_self_k_cache", "in_n_layer_self_v_cache", "n_layer_cross_k", "n_layer_cross_v",
           "offset"]
    outs = ["logits", "out_n_layer_self_k_cache", "out_n_layer_self_v_cache"]
    axes = {"tokens": {0: "n_audio", 1: "n_tokens"}, "in_n_layer_self_k_cache": {1: "n_audio"},
            "in_n_layer_self_v_cache": {1: "n_audio"}, "n_layer_cross_k": {1: "n_audio", 2: "T"},
            "n_layer_cross_v": {1: "n_audio", 2: "T"}, "logits": {0: "n_audio", 1: "n_tokens"},
            "out_n_layer_self_k_cache": {1: "n_audio"}, "out_n_layer_self_v_cache": {1: "n_audio"}}
    _onnx_export(dec, args, tmp / DECODER, ins, outs, axes, opset)
    n_tokens = write_tokens(tokenizer_json, tmp / TOKENS)
    heads = lambda kind: [getattr(l, kind).num_heads for l in model.model.decoder.layers]
    D = model.model.decoder.layers[0].self_attn.head_dim
    return {"encoder": ENCODER, "decoder": DECODER, "self_width": w_self, "cross_width": w_cross,
            "metadata": {ENCODER: metadata(model, tokenizer_json, decode, w_self)}, "tokens": n_tokens, "padding": padding_cost(heads("self_attn"), heads("encoder_attn"), D, ctx, S)}


def padding_cost(self_heads: list[int], cross_heads: list[int], head_dim: int, n_text_ctx: int,
                 n_audio_ctx: int) -> dict:
    """Bytes (fp32, batch 1) of the stacked caches against the per-layer caches they pad."""
    def cost(heads, rows):
        stacked = len(heads) * max(1, max(heads)) * head_dim * rows * 4 * 2
        own = sum(heads) * head_dim * rows * 4 * 2
        return {"stacked_bytes": stacked, "own_bytes": own, "padding_share": 1 - own / stacked if stacked else 0.0}
    return {"self": cost(self_heads, n_text_ctx), "cross": cost(cross_heads, n_audio_ctx)}


def check_dir(d: str | Path) -> dict:
    """The export config of a sherpa-onnx export directory whose files are all there (sizes and sha256
    as recorded); ExportDirError names the file that is missing or wrong."""
    from slim.export_format import load_export_config

    return load_export_config(d, layout="sherpa-onnx")


def tokens_of(d: Path) -> dict[int, bytes]:
    """tokens.txt read back: id -> token bytes."""
    out = {}
    for line in (Path(d) / TOKENS).read_text().splitlines():
        t, i = line.split()
        out[int(i)] = base64.b64decode(t)
    return out

