"""Real recorded English speech from a Debian package, labelled by a teacher model, as a training manifest.

Debian's `flight-of-the-amazon-queen` (main; a freeware adventure game whose license allows redistribution with
its notices, /usr/share/doc/flight-of-the-amazon-queen/copyright) ships the English CD version's voice-acted
dialogue: about 6,600 MP3 lines (11,025 Hz, 1-10 s, 4.6 h) inside `queen.1c`. They have no transcripts, so the
teacher (e.g. dense tiny.en) writes them, as distil-whisper does; the recovery then distils on real voices
instead of synthetic ones only. None of it is the evaluation speech (data/real-speech, ../shared/data).

    .venv/bin/python benchmarks/game_speech.py --model TEACHER --limit 800 --out data/synth-fotaq \
        [--mix data/synth-quickstart/train/manifest.jsonl --mix-limit 400 --mix-out data/synth-mix]

Without --deb it runs `apt-get download flight-of-the-amazon-queen` (Debian's package registry) in a temporary
folder. --mix writes a second manifest: every line of the given manifest plus the first --mix-limit labelled
lines, shuffled, audio paths absolute (a recipe's `data.train`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHIVE = "usr/share/scummvm/flight-of-the-amazon-queen/queen.1c"
PACKAGE = "flight-of-the-amazon-queen"


def read_queen_table(data: bytes) -> dict[str, bytes]:
    """The entries of a `queen.1c` resource archive by name: b'QTBL', a 6-byte version, 2 bytes, a compression
    byte, a big-endian entry count, then per entry a NUL-padded 12-byte name, a bundle byte, offset and size."""
    if data[:4] != b"QTBL":
        raise ValueError("not a queen.1c resource archive (no QTBL table at its start)")
    (count,) = struct.unpack_from(">H", data, 13)
    entries, pos = {}, 15
    for _ in range(count):
        name = data[pos:pos + 12].split(b"\0")[0].decode("ascii")
        offset, size = struct.unpack_from(">II", data, pos + 13)
        if offset + size > len(data):
            raise ValueError(f"entry {name} runs past the end of the archive")
        entries[name] = data[offset:offset + size]
        pos += 21
    return entries


def speech_lines(entries: dict[str, bytes]) -> dict[str, bytes]:
    """The spoken lines (`*.SB`, MP3 in the CD version), without the sound effects (`*SSSS.SB`)."""
    return {n[:-3]: b for n, b in entries.items() if n.endswith(".SB") and not n.endswith("SSSS.SB")}


def _archive(deb: str | None, work: Path) -> bytes:
    if deb is None:
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"apt-get download {PACKAGE} failed ({e}); download the package and pass --deb FILE")
        deb = str(next(work.glob(f"{PACKAGE}_*.deb")))
    subprocess.run(["dpkg-deb", "-x", deb, str(work / "x")], check=True)
    if not (work / "x" / ARCHIVE).is_file():
        raise SystemExit(f"{deb} holds no {ARCHIVE}: not the {PACKAGE} package")
    return (work / "x" / ARCHIVE).read_bytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the teacher that writes the transcripts (model dir or export)")
    p.add_argument("--out", required=True, help="folder for wav/ and manifest.jsonl")
    p.add_argument("--deb", help="the package file (default: apt-get download it)")
    p.add_argument("--limit", type=int, default=800, help="lines to label, drawn at random (seeded)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter lines are left out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mix", help="training DATA (a JSONL manifest or an audio folder) to mix the labelled lines into")
    p.add_argument("--mix-limit", type=int, default=400, help="labelled lines added to --mix's")
    p.add_argument("--mix-out", help="folder for the mixed manifest.jsonl")
    a = p.parse_args(argv)
    if a.mix and not a.mix_out:
        p.error("--mix needs --mix-out")

    import soundfile as sf
    from tqdm import tqdm

    from eval.engines import load_engine
    from eval.metrics import failure_counts
    from slim.audio import SAMPLING_RATE, AudioError, decode_audio
    from slim.data import SkipStats, open_items
    from slim.io import atomic_write_text

    with tempfile.TemporaryDirectory() as tmp:
        lines = speech_lines(read_queen_table(_archive(a.deb, Path(tmp))))
    names = sorted(lines)
    random.Random(a.seed).shuffle(names)
    out = Path(a.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    engine = load_engine(a.model, "auto", threads=a.threads)
    picked, skipped = [], {"short": 0, "unreadable": 0, "no_words": 0, "too_many_words": 0}
    for name in names:
        if len(picked) >= a.limit:
            break
        try:
            audio = decode_audio(lines[name], name)
        except AudioError:
            skipped["unreadable"] += 1
            continue
        if len(audio) < a.min_seconds * SAMPLING_RATE:
            skipped["short"] += 1
            continue
        picked.append((name, audio))
    rows = []
    for i in tqdm(range(0, len(picked), a.batch_size), desc="label", unit="batch"):
        chunk = picked[i:i + a.batch_size]
        for (name, audio), text in zip(chunk, engine.transcribe([x for _, x in chunk], batch_size=a.batch_size)):
            seconds = len(audio) / SAMPLING_RATE
            # no word (the eval's own test), or more words than anyone says in the time: a runaway. Not the
            # eval's repetition test: acted dialogue repeats itself ("Do it! Do it! Do it, do it!")
            if failure_counts([text])["empty"]:
                skipped["no_words"] += 1
                continue
            if len(re.findall(r"[A-Za-z']+", text)) > 5 * seconds + 3:
                skipped["too_many_words"] += 1
                continue
            sf.write(out / "wav" / f"{name}.wav", audio, SAMPLING_RATE, subtype="PCM_16")
            rows.append({"id": f"fotaq-{name}", "audio": f"wav/{name}.wav", "text": text.strip(),
                         "seconds": round(seconds, 3)})
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    minutes = sum(r["seconds"] for r in rows) / 60
    print(f"{len(rows)} lines ({minutes:.1f} min) -> {out / 'manifest.jsonl'}; left out: {skipped}")
    if a.mix:
        items, _ = open_items(a.mix, SkipStats())  # the training data reader's own items, paths resolved
        mixed = [{"id": it.id, "audio": str(it.path.resolve()), "text": it.text} for it in items]
        mixed += [{**r, "audio": str((out / r["audio"]).resolve())} for r in rows[:a.mix_limit]]
        random.Random(a.seed).shuffle(mixed)
        Path(a.mix_out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.mix_out) / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in mixed))
        print(f"{len(mixed)} lines -> {Path(a.mix_out) / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
