"""Atomic file writes: every file distill writes appears whole or not at all.

A reader (TensorBoard, ``distill report``, a second process, a resumed run) must never see a half-written
checkpoint, report or figure. Each writer therefore writes to a temporary file in the *same* folder (so the final
:func:`os.replace` is a rename within one file system, which POSIX and Windows make atomic), flushes it to disk,
and only then renames it over the target. On any exception the temporary file is removed and the old target, if
any, is left untouched.

:func:`atomic_path` is the primitive, for writers that want a file name (``torch.save``, ``fig.savefig``); the
``atomic_write_*`` helpers and :func:`atomic_savez` cover the common cases.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["atomic_path", "atomic_savez", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "run_folder"]


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to the disk (``O_RDWR``: Windows refuses to commit a read-only descriptor)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on failure delete it.

    The parent folder of ``path`` is created if missing. The temporary file (``.{name}.XXXX.tmp``, hidden, in the
    same folder) already exists, empty, when the block starts; the block writes it by name, e.g.
    ``torch.save(obj, tmp)``. When the block exits normally the file is fsynced and renamed over ``path`` with
    :func:`os.replace`; when it raises (``KeyboardInterrupt`` included) the file is removed, ``path`` keeps its old
    content and the exception propagates.

    Args:
        path: The file to write.

    Yields:
        The temporary file to write instead of ``path``.

    Example:
        >>> with atomic_path(run_dir / "student.ckpt") as tmp:  # doctest: +SKIP
        ...     torch.save(ckpt, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions of a new file
    try:
        yield tmp
        # Flush the data before the rename: file systems may commit the rename (metadata) before the data blocks,
        # so a crash right after os.replace could otherwise leave ``path`` present but empty or truncated.
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`), encoded as ``encoding``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON (``json.dumps(obj, indent=indent)``, no trailing newline) atomically.

    The object is serialised before anything touches the disk, so an object JSON cannot encode raises
    ``TypeError`` and leaves ``path`` as it was.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_savez(path: str | os.PathLike[str], /, **arrays: npt.ArrayLike) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` (:func:`numpy.savez`) atomically, never pickling.

    ``path`` is used as given: unlike ``np.savez(filename)``, no ``.npz`` suffix is appended. Read it back with
    ``np.load(path, allow_pickle=False)``.

    Args:
        path: The file to write.
        **arrays: Array name -> array-like (numeric, bool or string; object arrays are refused).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If an array has dtype ``object`` (it would need pickling).
    """
    # The archive np.savez writes (one .npy member per array, stored uncompressed), written here: np.savez of NumPy
    # 2.0 and older has no allow_pickle argument (1.24 and 1.26 store it as an array of that name), and none can store
    # an array named "allow_pickle" or "file".
    converted = {name: np.asanyarray(value) for name, value in arrays.items()}
    for name, value in converted.items():
        if value.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype {value.dtype}: writing it would need a pickle, refused")
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in converted.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)
    return Path(path)


def run_folder(trainer: Any) -> Path:
    """The folder a run writes its artifacts into: ``trainer.log_dir``, else ``trainer.default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)
