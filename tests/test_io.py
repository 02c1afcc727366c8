"""Atomic writes (distill.io): whole file or old file, never a partial one, never a stray temp file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from distill.io import atomic_path, atomic_savez, atomic_write_bytes, atomic_write_json, atomic_write_text


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_yields_temp_in_same_folder_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and tmp.exists()
        tmp.write_bytes(b"new content")
        assert target.read_bytes() == b"old"  # the target is untouched until the block succeeds
    assert target.read_bytes() == b"new content"
    assert _names(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_old_file_and_removes_temp(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')
    with pytest.raises(type(exc)), atomic_path(target) as tmp:
        tmp.write_text('{"new": tr')
        raise exc
    assert target.read_text() == '{"old": true}'
    assert _names(tmp_path) == ["report.json"]


def test_failure_without_previous_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boom"), atomic_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert _names(tmp_path) == []


def test_fsync_happens_before_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert calls == ["fsync", "replace"]


def test_parent_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert _names(target.parent) == ["c.txt"]


def test_write_bytes_text_json_replace_content(tmp_path: Path) -> None:
    b, t, j = tmp_path / "b.bin", tmp_path / "t.md", tmp_path / "j.json"
    for i in range(2):
        assert atomic_write_bytes(b, bytes([i]) * 3) == b
        assert atomic_write_text(str(t), f"# run {i}\n") == t
        assert atomic_write_json(j, {"run": i, "xs": [1.5, 2]}, indent=1) == j
    assert b.read_bytes() == b"\x01\x01\x01"
    assert t.read_text() == "# run 1\n"
    assert json.loads(j.read_text()) == {"run": 1, "xs": [1.5, 2]}
    assert j.read_text() == json.dumps({"run": 1, "xs": [1.5, 2]}, indent=1)
    assert _names(tmp_path) == ["b.bin", "j.json", "t.md"]


def test_json_that_cannot_serialise_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "h.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert _names(tmp_path) == ["h.json"]


def test_savez_round_trip_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "initial": rng.standard_normal(17).astype(np.float32),
        "codes": rng.integers(0, 255, size=(3, 4), dtype=np.uint8),
        "mask": rng.random(5) > 0.5,
        "layer_name": np.array("fc1.weight"),
        "path": np.arange(3),  # an array may be called "path": the target argument is positional-only
        "allow_pickle": np.zeros(2),  # and "allow_pickle": no argument of np.savez is passed
    }
    target = tmp_path / "weights.npz"
    assert atomic_savez(target, **arrays) == target
    with np.load(target, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(arrays)
        for name, value in arrays.items():
            assert data[name].dtype == value.dtype
            np.testing.assert_array_equal(data[name], value)
    assert _names(tmp_path) == ["weights.npz"]


def test_savez_keeps_the_name_as_given(tmp_path: Path) -> None:
    target = tmp_path / "weights.data"  # np.savez(filename) would append ".npz"
    atomic_savez(target, x=np.ones(2))
    assert _names(tmp_path) == ["weights.data"]
    with np.load(target, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["x"], np.ones(2))


def test_savez_refuses_object_arrays_and_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "w.npz"
    atomic_savez(target, x=np.zeros(3))
    with pytest.raises(ValueError, match="pickle"):
        atomic_savez(target, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="'y'.*pickle"):  # a structured dtype holding objects too
        atomic_savez(target, y=np.zeros(2, dtype=[("a", "f4"), ("b", "O")]))
    with np.load(target, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["x"], np.zeros(3))
    assert _names(tmp_path) == ["w.npz"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
