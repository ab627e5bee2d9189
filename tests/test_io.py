"""slim.io: atomic files and directories leave the old content or the new one, and no temp files."""

import json
import os

import pytest

from slim.io import atomic_dir, atomic_write_json, atomic_write_text, replace_dir


def test_atomic_write_text_and_json_replace_the_file_and_leave_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"x": "é"})
    assert p.read_text() == '{\n  "x": "\\u00e9"\n}\n'
    atomic_write_json(p, {"x": "é"}, ensure_ascii=False)
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": "é"} and "é" in p.read_text(encoding="utf-8")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert sorted(os.listdir(p.parent)) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def denied(src, dst):
        raise PermissionError("denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_replaces_a_whole_directory_or_nothing(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(out) == ["old.txt"]
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-")
        (tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(out) == ["new.txt"]
    with atomic_dir(tmp_path / "made-by-writer", create=False) as tmp:
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "f").write_text("f")
    assert (tmp_path / "made-by-writer" / "f").read_text() == "f"


def test_replace_dir_over_an_existing_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "a").write_text("new"), (dst / "b").write_text("old")
    replace_dir(src, dst)
    assert os.listdir(tmp_path) == ["dst"] and os.listdir(dst) == ["a"]
