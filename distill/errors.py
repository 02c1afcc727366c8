"""Errors in what the user gave distill, and reading checkpoints safely.

Every error caused by the user's input (a config value, a checkpoint, a compressed file, a data path, a layer name)
derives from :class:`DistillError` as well as from the built-in type it always had (``FileNotFoundError``,
``ValueError``, ...), so ``except ValueError`` keeps working. Its message names the problem and the fix. The
``distill`` command prints such an error as one line, without the traceback (which the user cannot act on, and which
jsonargparse buries under its own report when the error comes from building a class of the config); set
``DISTILL_TRACEBACK=1`` to see it anyway. So is a ``ValueError`` raised while one of distill's classes checks the
arguments the config gave it (:func:`find_config_error`: it names the class). Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["CheckpointError", "ConfigError", "DistillError", "MissingCheckpointError", "check_checkpoint_file",
           "find_config_error", "find_exception", "find_user_error", "first_line", "producer_hint", "read_checkpoint",
           "user_message"]

_REPO = Path(__file__).resolve().parents[1]
_E = TypeVar("_E", bound=BaseException)


class DistillError(Exception):
    """An error in the user's input; the message says what is wrong and how to fix it."""


class CheckpointError(DistillError, ValueError):
    """A checkpoint file cannot be read (not a PyTorch checkpoint, truncated, corrupted) or holds the wrong things."""


class ConfigError(DistillError, ValueError):
    """A config value that can only be checked once the run starts (a data split larger than the data set, an
    optimizer argument torch rejects); the message names the value and where to change it."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint path that is not a file."""


def producer_hint(path: str | os.PathLike[str]) -> str | None:
    """``"It is produced by: distill fit -c CONFIG"`` for the config (in ``./configs`` or distill's own) whose
    ``checkpoint.dirpath`` is the folder of ``path``; None if no config writes there."""
    parent = Path(path).parent
    try:
        parent_rel = parent.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        parent_rel = parent.as_posix()
    pattern = re.compile(rf"^\s*dirpath:\s*['\"]?(\./)?{re.escape(parent_rel)}/?['\"]?\s*$", re.MULTILINE)
    for root in dict.fromkeys([Path.cwd() / "configs", _REPO / "configs"]):
        if not root.is_dir():
            continue
        for cfg in sorted(root.rglob("*.yaml")):
            try:
                if pattern.search(cfg.read_text()):
                    return f"It is produced by: distill fit -c {os.path.relpath(cfg, Path.cwd())}"
            except OSError:
                continue
    return None


def read_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with an error a user can act on.

    ``weights_only=True`` always: a checkpoint's objects are tensors and plain containers, never code; distill does
    not fall back to unpickling (torch's own message suggests it, which would run whatever the file holds).

    Raises:
        FileNotFoundError: if ``path`` is not a file (a :class:`CheckpointError`).
        CheckpointError: if the file is not a readable checkpoint, naming the file and the reason.
    """
    p = _intact_file(path, what, lambda: producer_hint(Path(path).expanduser())
                     or "Fix: point at an existing checkpoint, or run the training that writes it first.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: say which and why, in the user's terms
        if isinstance(err, MemoryError):
            raise
        raise _unreadable(what, path, _not_a_zip(p) or _load_failure(err)) from err


def _unreadable(what: str, path: str | os.PathLike[str], reason: str) -> CheckpointError:
    return CheckpointError(f"cannot read {what} {str(path)!r}: {reason}. Fix: point at a checkpoint written by "
                           "`distill fit` (runs/<name>/checkpoints/last.ckpt), or write it again.")


def _load_failure(err: Exception) -> str:
    """Why ``torch.load`` failed on a complete zip archive, in the user's terms."""
    if "Weights only load failed" in str(err):
        return ("it holds Python objects other than tensors and plain containers, which distill does not unpickle "
                "(that would run code from the file)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"not a PyTorch checkpoint, or corrupted ({type(err).__name__}: {first[:200]})"


def _not_a_zip(path: Path) -> str | None:
    """Why ``path`` is not a complete zip archive (the format ``torch.save`` writes), or ``None`` if it is one."""
    if zipfile.is_zipfile(path):
        return None
    with path.open("rb") as f:
        truncated = f.read(4) == b"PK\x03\x04"  # a zip's first local header, but no end-of-archive record
    return ("the file is truncated (a PyTorch zip archive without its end)" if truncated
            else "not a PyTorch checkpoint (torch.save writes a zip archive)")


def _corrupt_member(path: Path) -> str | None:
    """Why a complete zip archive is damaged (a member whose bytes fail its CRC-32), or ``None`` if none is.

    ``torch.load`` does not check the CRCs its zip archives carry: a checkpoint with flipped bytes in a tensor loads
    without a word, with wrong weights. Reading the file once more costs little next to the load that follows (the
    second read comes from the page cache)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        return f"the file is corrupted ({type(err).__name__}: {err})"
    return None if bad is None else f"the file is corrupted (its member {bad!r} fails its CRC-32 check)"


def _intact_file(path: str | os.PathLike[str], what: str, missing_fix: Callable[[], str]) -> Path:
    """``path`` as a :class:`Path`, checked without loading it: a file (not a folder: then the checkpoint in it is
    suggested), a complete zip archive (the format ``torch.save`` writes), no member failing its CRC-32.
    ``missing_fix()`` gives the fix for a path that does not exist (only then: it may search the configs).

    Raises:
        MissingCheckpointError: for a folder, or a path that does not exist (with ``missing_fix``).
        CheckpointError: for a file that is not a complete, intact checkpoint archive.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        found = next((c for c in (p / "checkpoints" / "last.ckpt", p / "last.ckpt") if c.is_file()), None)
        example = str(found) if found is not None else f"{Path(path) / 'checkpoints' / 'last.ckpt'}"
        raise MissingCheckpointError(f"{what} {str(path)!r} is a folder, not a checkpoint file. Fix: give the "
                                     f"checkpoint file in it, e.g. {example}")
    if not p.is_file():
        raise MissingCheckpointError(f"{what} {str(path)!r} does not exist (or is not a file). {missing_fix()}")
    reason = _not_a_zip(p) or _corrupt_member(p)
    if reason is not None:
        raise _unreadable(what, path, reason)
    return p


def check_checkpoint_file(path: str | os.PathLike[str], what: str = "checkpoint", lightning: bool = False) -> None:
    """Fail early on a checkpoint path that is missing, not a complete zip archive (the format ``torch.save``
    writes), or damaged (a CRC mismatch, which ``torch.load`` would not notice): a resumed run should not die after
    setting everything up, nor go on from corrupted weights.

    ``lightning``: the file must also be a Lightning checkpoint (``state_dict`` and ``pytorch-lightning_version``,
    which Lightning reads with a bare ``KeyError``). Its keys are read with ``mmap=True``: the tensors are not loaded.
    A checkpoint whose extra entries need full unpickling (a user's own hyper-parameter objects) is left to Lightning.
    """
    p = _intact_file(path, what, lambda: "Fix: give the path of a checkpoint written by `distill fit`, e.g. "
                                         "runs/<name>/checkpoints/last.ckpt")
    if not lightning:
        return
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - Lightning loads it its own way; only a plain failure is ours to report
        if isinstance(err, MemoryError) or "Weights only load failed" in str(err):
            return
        raise _unreadable(what, path, _load_failure(err)) from err
    missing = [k for k in ("state_dict", "pytorch-lightning_version") if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        held = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{what} {str(path)!r} is not a Lightning checkpoint: it has no {' or '.join(map(repr, missing))} "
            f"(it holds {held}). Fix: give a checkpoint written by `distill fit` (runs/<name>/checkpoints/last.ckpt); "
            "to start from plain weights, use the LoadWeights callback instead of --ckpt_path"
        )


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (torch's often span many), or its type's name if it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def user_message(err: BaseException) -> str:
    """The message of an exception as a user should read it (a ``KeyError``'s without the quotes ``str`` adds)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in ("distill", "models"))


def _chain(exc: BaseException) -> list[BaseException]:
    seen: set[int] = set()
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        out.append(cur)
        todo += [cur.__cause__, cur.__context__]
    return out


def find_config_error(exc: BaseException) -> tuple[str, ValueError] | None:
    """A ``ValueError`` raised while one of distill's or the models' classes was being constructed (in its
    ``__init__``, or a helper it called), in the chain of ``exc``, with that class's name: the check of an argument
    that came from the config. ``None`` if there is none."""
    for cur in _chain(exc):
        if not isinstance(cur, ValueError) or isinstance(cur, DistillError):
            continue
        frames = []
        tb = cur.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        # the innermost frames, back to the first one outside distill and models (jsonargparse's instantiation)
        ours = []
        for frame in reversed(frames):
            if not frame.f_code.co_filename.startswith(_PACKAGES):
                break
            ours.append(frame)
        for frame in reversed(ours):  # the outermost constructor among them: the class the config names
            obj = frame.f_locals.get("self")
            if frame.f_code.co_name == "__init__" and obj is not None:
                return type(obj).__name__, cur
    return None


def find_exception(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of type ``kind`` in the chain of ``exc`` (itself, then its ``__cause__`` and
    ``__context__``, recursively), or ``None``."""
    return next((cur for cur in _chain(exc) if isinstance(cur, kind)), None)


def find_user_error(exc: BaseException) -> DistillError | None:
    """The :class:`DistillError` that caused ``exc``, following ``__cause__`` and ``__context__`` (jsonargparse
    and Lightning re-raise their own exceptions from ours), or ``None``."""
    return find_exception(exc, DistillError)
