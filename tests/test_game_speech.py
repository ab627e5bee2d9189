"""benchmarks/game_speech.py: the queen.1c table reader, on an archive written here."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks.game_speech import read_queen_table, speech_lines  # noqa: E402


def _archive(entries: dict[str, bytes]) -> bytes:
    head = b"QTBL" + b"CEM10\0" + b"\0\0" + b"\x01" + struct.pack(">H", len(entries))
    offset = len(head) + 21 * len(entries)
    table, body = b"", b""
    for name, data in entries.items():
        table += name.encode().ljust(12, b"\0") + b"\x01" + struct.pack(">II", offset + len(body), len(data))
        body += data
    return head + table + body


def test_reads_every_entry_and_keeps_the_spoken_lines():
    entries = {"620026P1.SB": b"ID3line-one", "1000SSSS.SB": b"effect", "ROOM1.BBK": b"image", "C18C_481.SB": b"two"}
    got = read_queen_table(_archive(entries))
    assert got == entries
    assert speech_lines(got) == {"620026P1": b"ID3line-one", "C18C_481": b"two"}


def test_rejects_other_files_and_truncated_archives():
    with pytest.raises(ValueError, match="QTBL"):
        read_queen_table(b"RIFF" + bytes(40))
    whole = _archive({"A.SB": b"x" * 100})
    with pytest.raises(ValueError, match="A.SB"):
        read_queen_table(whole[:-10])
