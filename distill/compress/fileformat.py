"""The compressed model file (``.dstl``): writer and reader. The layout is documented in ``docs/FORMAT.md``.

A file holds the architecture (``class_path``/``init_args``, see :mod:`distill.arch`) and every tensor of the
state dict. Each compressible weight whose values come from a small codebook (after pruning and weight sharing) is
stored as in Deep Compression (Han, Mao & Dally, ICLR 2016): a codebook (float32, or float16 when exact), and the
Huffman-coded cluster codes and relative-index gaps of its non-zero entries (:mod:`distill.compress.sparse`,
:mod:`distill.compress.huffman`). Every other tensor is stored raw (since version 3, a float32 tensor whose values
are all exactly float16 -- e.g. biases rounded by ``deep_compress(raw_dtype="float16")`` -- in 2 bytes per value,
and a mostly-zero one as a bitmap plus its non-zero values).
The index width is chosen per tensor to minimise its size.

Reading never unpickles and never runs code from the file: the header is JSON (zlib-compressed since version 2),
tensors are raw bytes, and the model class must be an importable ``nn.Module`` subclass. A truncated, corrupted,
foreign or newer file raises :class:`CompressedFileError`.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import distill
from distill.arch import ArchitectureError, arch_spec, build_module
from distill.compress import huffman
from distill.compress.params import compressible_parameters
from distill.compress.sparse import best_index_bits, decode_positions, encode_positions
from distill.errors import ConfigError, DistillError, first_line
from distill.io import atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "READABLE_VERSIONS",
    "CompressedFileError",
    "RebuildError",
    "decode_into",
    "load_compressed",
    "load_compressed_state_dict",
    "read_header",
    "save_compressed",
]

MAGIC = b"\x89DSTL\r\n\x1a"  # PNG-style: non-ASCII first byte, CR-LF and ^Z catch text-mode mangling
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
HUFFMAN_SPARSE = "huffman-sparse"
RAW = "raw"
RAW_F16 = "raw-f16"  # version 3: a float32 tensor whose every value is exactly a float16, stored in half the bytes
RAW_SPARSE = "raw-sparse"  # version 3: a float32 tensor with many zeros: non-zero bitmap + the non-zero values
MAX_CODEBOOK = (1 << 16) - 1

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class CompressedFileError(DistillError, ValueError):
    """A compressed model file is not valid: foreign, truncated, corrupted, of an unknown version or inconsistent."""


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"cannot store a tensor of dtype {dtype}; supported: {sorted(_DTYPES)}")
    return name


def _raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()  # little-endian on every platform torch supports


def _encode_raw_v3(t: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    """The smallest lossless version-3 raw record of a float32 tensor: ``raw``, ``raw-f16`` or ``raw-sparse``.

    ``raw-f16`` when every value is exactly a float16; ``raw-sparse`` (a bit per value saying non-zero, then the
    non-zero values in float16 when exact, else float32) when zeros make that smaller, e.g. the biases of hidden units
    that :func:`distill.compress.structure.remove_dead_units` cleared.
    """
    flat = t.detach().cpu().reshape(-1)
    half = flat.half()
    exact16 = bool(torch.equal(half.float(), flat))
    dense = (RAW_F16, _raw_bytes(half)) if exact16 else (RAW, _raw_bytes(flat))
    nz = flat != 0
    values = (half if exact16 else flat)[nz]
    bitmap = np.packbits(nz.numpy(), bitorder="little").tobytes()
    sparse = bitmap + _raw_bytes(values)
    if len(sparse) < len(dense[1]):
        rec = {"encoding": RAW_SPARSE, "nonzero": int(nz.sum()), "value_dtype": "float16" if exact16 else "float32"}
        return rec, sparse
    return {"encoding": dense[0]}, dense[1]


def _encode_weight(t: torch.Tensor, max_index_bits: int, version: int) -> tuple[dict[str, Any], bytes] | None:
    """Huffman-sparse record of a float32 tensor, or None when it has too many distinct values to share.

    Version 2 stores the code length tables with 4 bits per symbol when they fit, and the codebook as float16 when
    every value is exactly a float16 (checked by round trip, so the decoded weights stay bit-identical).
    """
    flat = t.detach().cpu().reshape(-1).numpy()
    positions = np.flatnonzero(flat)
    values = flat[positions]
    codebook, codes = np.unique(values, return_inverse=True)
    if codebook.size > MAX_CODEBOOK:
        return None
    compact = version >= 2
    half = compact and bool(np.array_equal(codebook.astype("<f2").astype(np.float32), codebook))
    codes = codes.astype(np.int64) + 1  # code 0 is the exact zero (pruned weights and padding entries)
    bits, _ = best_index_bits(positions, codes, max_index_bits, nibbles=compact)
    gaps, real = encode_positions(positions, bits)
    entry_codes = np.zeros(gaps.size, dtype=np.int64)
    entry_codes[real] = codes
    cs = huffman.encode(entry_codes)
    gs = huffman.encode(gaps)
    code_table, code_table_bits = huffman.pack_lengths(cs.lengths, nibbles=compact)
    gap_table, gap_table_bits = huffman.pack_lengths(gs.lengths, nibbles=compact)
    payload = b"".join(
        [
            codebook.astype("<f2" if half else "<f4").tobytes(),
            code_table,
            gap_table,
            cs.sync.astype("<u4").tobytes(),
            gs.sync.astype("<u4").tobytes(),
            cs.data,
            gs.data,
        ]
    )
    record = {
        "encoding": HUFFMAN_SPARSE,
        "nonzero": int(positions.size),
        "codebook": int(codebook.size),
        "index_bits": int(bits),
        "entries": int(gaps.size),
        "code_table": int(cs.lengths.size),
        "code_bits": cs.n_bits,
        "code_bytes": len(cs.data),
        "gap_table": int(gs.lengths.size),
        "gap_bits": gs.n_bits,
        "gap_bytes": len(gs.data),
        "sync_interval": huffman.SYNC_INTERVAL,
    }
    if compact:
        record.update(
            {"codebook_dtype": "float16" if half else "float32", "code_table_bits": code_table_bits,
             "gap_table_bits": gap_table_bits}
        )  # fmt: skip
    return record, payload


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    compress: Iterable[str] | None = None,
    arch: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    max_index_bits: int = 12,
    version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """Write ``model`` (its architecture and state dict) to a compressed file, atomically.

    The values are stored exactly: quantize the model first (:func:`distill.compress.quantize_model` or a
    ``GMMPrior``); a compressible weight with more than 65,535 distinct non-zero values, or one that would not get
    smaller, is stored raw.

    Args:
        model: the network; it must be rebuildable from ``arch`` (default :func:`distill.arch.arch_spec`).
        path: destination (parent folders are created).
        compress: state-dict names to compress (default :func:`compressible_parameters`, i.e. Linear/Conv weights).
        arch: architecture description overriding ``arch_spec(model)``.
        meta: JSON-serialisable metadata stored in the header (e.g. bit widths, accuracy).
        max_index_bits: widest relative index considered.
        version: format version to write: 3 (default: as 2, and float32 tensors stored raw in float16 when that is
            exact), 2 (zlib-compressed header, 4-bit code length tables, float16 codebooks when exact) or 1 (plain
            JSON header, 8-bit tables, float32 codebooks).

    Returns:
        The header that was written (with ``file_bytes`` added).

    Raises:
        KeyError: if a name in ``compress`` is not in the state dict.
        ValueError: if ``version`` is not one this writer produces.
    """
    if version not in READABLE_VERSIONS:
        raise ValueError(f"version must be one of {READABLE_VERSIONS}, got {version!r}")
    state = model.state_dict()
    names = set(compressible_parameters(model) if compress is None else compress)
    missing = names - set(state)
    if missing:
        raise KeyError(f"compress names {sorted(missing)} are not in the model's state dict")
    param_names = {n for n, _ in model.named_parameters()}
    records: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, t in state.items():
        rec: dict[str, Any] = {
            "name": name,
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "param": name in param_names,
        }
        fields: dict[str, Any]
        if version >= 3 and t.dtype == torch.float32 and t.numel() > 0:
            fields, data = _encode_raw_v3(t)
        else:
            fields, data = {"encoding": RAW}, _raw_bytes(t)
        if name in names and t.dtype == torch.float32:
            enc = _encode_weight(t, max_index_bits, version)
            if enc is not None and len(enc[1]) < len(data):  # the smaller of the shared and the raw record
                fields, data = enc
        rec.update(fields)
        rec["offset"], rec["length"] = offset, len(data)
        offset += len(data)
        records.append(rec)
        chunks.append(data)
    header = {
        "format": "distill-compressed",
        "producer": f"distill {distill.__version__}",
        "arch": dict(arch) if arch is not None else arch_spec(model),
        "payload_bytes": offset,
        "tensors": records,
        "meta": dict(meta or {}),
    }
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if version >= 2:
        hbytes = zlib.compress(hbytes, 9)  # the JSON header is ~10% of a 100x-compressed LeNet file; zlib cuts ~2/3
    body = _PREFIX.pack(MAGIC, version, len(hbytes)) + hbytes + b"".join(chunks)
    blob = body + _CRC.pack(zlib.crc32(body))
    atomic_write_bytes(path, blob)
    header["file_bytes"] = len(blob)
    header["header_bytes"] = len(hbytes)
    return header


def _parse(blob: bytes, source: str) -> tuple[dict[str, Any], memoryview]:
    """Validate the container and return (header, payload)."""
    if len(blob) < _PREFIX.size or blob[:8] != MAGIC:
        if len(blob) < _PREFIX.size and MAGIC.startswith(blob[:8]) and blob:
            raise CompressedFileError(f"{source}: truncated ({len(blob)} bytes, not even a complete preamble)")
        if blob[:4] == b"PK\x03\x04":  # a zip archive: what torch.save (a Lightning .ckpt) writes
            fix = ("it looks like a PyTorch checkpoint. Fix: write a compressed file from it with "
                   f"`distill compress {source} --out model.dstl` and use that")
        else:
            fix = "Fix: write one with `distill compress <checkpoint or run folder> --out model.dstl`"
        raise CompressedFileError(
            f"{source}: not a distill compressed file (expected magic {MAGIC!r}, found {blob[:8]!r}); {fix}"
        )
    _, version, hlen = _PREFIX.unpack_from(blob)
    if version not in READABLE_VERSIONS:
        raise CompressedFileError(
            f"{source}: format version {version} is not supported (this distill reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade distill to read it"
        )
    start = _PREFIX.size + hlen
    header: dict[str, Any] | None = None
    if start + _CRC.size <= len(blob):
        try:
            raw = bytes(blob[_PREFIX.size : start])
            header = json.loads((zlib.decompress(raw) if version >= 2 else raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, zlib.error):
            header = None
    expected = start + int(header.get("payload_bytes", -1)) + _CRC.size if isinstance(header, dict) else None
    if header is None and start + _CRC.size > len(blob) or (expected is not None and len(blob) < expected):
        want = f"{expected} bytes" if expected is not None else f"at least {start + _CRC.size} bytes"
        raise CompressedFileError(f"{source}: truncated file ({len(blob)} bytes, expected {want})")
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    if zlib.crc32(memoryview(blob)[: len(blob) - _CRC.size]) != crc:
        raise CompressedFileError(f"{source}: corrupted file (CRC32 checksum mismatch)")
    if not isinstance(header, dict) or header.get("format") != "distill-compressed" or expected != len(blob):
        raise CompressedFileError(f"{source}: corrupted file (inconsistent header)")
    return header, memoryview(blob)[start : len(blob) - _CRC.size]


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON header of a compressed file (plus ``file_bytes``)."""
    blob = _read(path)
    header, _ = _parse(blob, str(path))
    header["file_bytes"] = len(blob)
    return header


def _read(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"compressed model file not found: {p}")
    return p.read_bytes()


def _decode_record(rec: Mapping[str, Any], data: memoryview) -> torch.Tensor:
    dtype = _DTYPES[rec["dtype"]]
    shape = [int(s) for s in rec["shape"]]
    numel = int(np.prod(shape)) if shape else 1
    if rec["encoding"] == RAW_SPARSE:
        if dtype != torch.float32:
            raise ValueError(f"encoding {RAW_SPARSE!r} is only defined for float32 tensors, not {rec['dtype']}")
        value_dtype = {"float16": "<f2", "float32": "<f4"}.get(rec.get("value_dtype", ""))
        if value_dtype is None:
            raise ValueError(f"unknown value_dtype {rec.get('value_dtype')!r} of a {RAW_SPARSE!r} record")
        nbitmap = (numel + 7) // 8
        nonzero = int(rec["nonzero"])
        if len(data) != nbitmap + nonzero * np.dtype(value_dtype).itemsize:
            raise ValueError(f"sparse tensor holds {len(data)} bytes, expected {nbitmap} + {nonzero} values")
        mask = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=nbitmap), count=numel, bitorder="little")
        if int(mask.sum()) != nonzero:
            raise ValueError(f"sparse tensor's bitmap marks {int(mask.sum())} non-zeros, the record says {nonzero}")
        out = np.zeros(numel, dtype=np.float32)
        out[mask.astype(bool)] = np.frombuffer(data, dtype=value_dtype, offset=nbitmap, count=nonzero)
        return torch.from_numpy(out).reshape(shape)
    if rec["encoding"] == RAW_F16:
        if dtype != torch.float32:
            raise ValueError(f"encoding {RAW_F16!r} is only defined for float32 tensors, not {rec['dtype']}")
        if len(data) != 2 * numel:
            raise ValueError(f"float16 tensor holds {len(data)} bytes, expected {2 * numel}")
        half = np.frombuffer(data, dtype="<f2", count=numel)
        return torch.from_numpy(half.astype(np.float32)).reshape(shape)
    if rec["encoding"] == RAW:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if len(data) != numel * itemsize:
            raise ValueError(f"raw tensor holds {len(data)} bytes, expected {numel * itemsize}")
        if numel == 0:
            return torch.zeros(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    if rec["encoding"] != HUFFMAN_SPARSE or dtype != torch.float32:
        raise ValueError(f"unknown encoding {rec['encoding']!r} for dtype {rec['dtype']}")
    k, at = int(rec["codebook"]), 0
    entries = int(rec["entries"])
    if int(rec.get("sync_interval", huffman.SYNC_INTERVAL)) != huffman.SYNC_INTERVAL:
        raise ValueError(f"sync interval {rec['sync_interval']} is not {huffman.SYNC_INTERVAL}")
    code_sync = 4 * huffman.sync_count(entries, int(rec["code_bits"]))
    gap_sync = 4 * huffman.sync_count(entries, int(rec["gap_bits"]))
    cb_dtype = {"float32": "<f4", "float16": "<f2"}[rec.get("codebook_dtype", "float32")]
    code_table_bits, gap_table_bits = int(rec.get("code_table_bits", 8)), int(rec.get("gap_table_bits", 8))
    table_size = {8: lambda n: n, 4: lambda n: (n + 1) // 2}
    parts = []
    sizes = [
        np.dtype(cb_dtype).itemsize * k,
        table_size[code_table_bits](int(rec["code_table"])),
        table_size[gap_table_bits](int(rec["gap_table"])),
        code_sync,
        gap_sync,
    ]
    for size in (*sizes, int(rec["code_bytes"]), int(rec["gap_bytes"])):
        parts.append(bytes(data[at : at + size]))
        at += size
    if at != len(data):
        raise ValueError(f"record holds {len(data)} bytes, its fields {at}")
    codebook = np.concatenate([[0.0], np.frombuffer(parts[0], dtype=cb_dtype).astype(np.float32)]).astype(np.float32)
    code_lengths = huffman.unpack_lengths(parts[1], int(rec["code_table"]), code_table_bits)
    gap_lengths = huffman.unpack_lengths(parts[2], int(rec["gap_table"]), gap_table_bits)
    codes = huffman.decode(code_lengths, parts[5], entries, int(rec["code_bits"]), np.frombuffer(parts[3], "<u4"))
    gaps = huffman.decode(gap_lengths, parts[6], entries, int(rec["gap_bits"]), np.frombuffer(parts[4], "<u4"))
    if gaps.size and gaps.max() >= (1 << int(rec["index_bits"])):
        raise ValueError("a gap exceeds the index width")
    positions = decode_positions(gaps)
    if codes.size and (codes.max() > k or positions[-1] >= numel):
        raise ValueError("codes or positions out of range")
    flat = np.zeros(numel, dtype=np.float32)
    flat[positions] = codebook[codes]
    if int(np.count_nonzero(flat)) != int(rec["nonzero"]):
        raise ValueError("decoded non-zero count differs from the header")
    return torch.from_numpy(flat).reshape(shape)


def load_compressed_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode every tensor of a compressed file.

    Returns:
        ``(state_dict, header)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CompressedFileError: if the file is not a valid compressed model file.
    """
    blob = _read(path)
    header, payload = _parse(blob, str(path))
    header["file_bytes"] = len(blob)
    state: dict[str, torch.Tensor] = {}
    try:
        for rec in header["tensors"]:
            off, length = int(rec["offset"]), int(rec["length"])
            if off < 0 or length < 0 or off + length > len(payload):
                raise ValueError("record lies outside the payload")
            state[str(rec["name"])] = _decode_record(rec, payload[off : off + length])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CompressedFileError(f"{path}: corrupted file (tensor {rec.get('name', '?')!r}: {err})") from err
    return state, header


def decode_into(module: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load a compressed file's tensors into an existing ``module`` (for models the file cannot rebuild).

    Raises:
        CompressedFileError: if the file is invalid.
        RuntimeError: from ``load_state_dict`` if names or shapes do not match (with ``strict``).
    """
    state, _ = load_compressed_state_dict(path)
    module.load_state_dict(state, strict=strict)
    return module


class RebuildError(CompressedFileError, ArchitectureError):
    """The architecture a compressed file records cannot be rebuilt into a model its tensors fit (e.g. a plain
    ``nn.Module`` built with non-default constructor arguments, which the file could not record)."""


def _rebuild_fix(path: str | os.PathLike[str], arch: Mapping[str, Any]) -> str:
    cls = str(arch.get("class_path", "?")).rpartition(".")[2]
    return (
        f"Fix: build the model yourself and load the file into it with distill.compress.decode_into({cls}(...), "
        f"{str(path)!r}), or write the file again with its constructor arguments recorded: "
        f"save_compressed(model, path, arch={{'class_path': ..., 'init_args': {{...}}}}) (or give the class an "
        "`init_args` dict attribute, as models/ do)"
    )


def _shape_mismatch(state: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """The first difference between the file's tensors and ``model``'s state dict, in words; None if they fit."""
    mine = model.state_dict()
    for name, t in state.items():
        if name in mine and tuple(mine[name].shape) != tuple(t.shape):
            return (f"{name} is {list(t.shape)} in the file but {list(mine[name].shape)} in the rebuilt model")
    missing = [n for n in mine if n not in state]
    unexpected = [n for n in state if n not in mine]
    if missing or unexpected:
        parts = ([f"the rebuilt model has {missing[:3]} that the file lacks"] if missing else []) + (
            [f"the file has {unexpected[:3]} that the rebuilt model lacks"] if unexpected else [])
        return "; ".join(parts)
    return None


def _device(map_location: str | torch.device) -> torch.device:
    try:
        return torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(
            f"map_location={map_location!r} is not a torch device. Fix: pass 'cpu', 'cuda', 'cuda:0', 'mps' or a "
            "torch.device"
        ) from err


def load_compressed(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a compressed file (architecture from the header, tensors decoded), in eval mode.

    The architecture is the header's ``class_path``/``init_args``. A plain ``nn.Module`` records no constructor
    arguments, so one built with non-default arguments cannot be rebuilt: build it yourself and load the tensors with
    :func:`decode_into`.

    Args:
        path: the compressed file.
        map_location: the device the model is moved to (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CompressedFileError: if the file is invalid, or (:class:`RebuildError`, also a
            :class:`distill.arch.ArchitectureError`) if its model cannot be rebuilt with shapes its tensors fit.
        distill.arch.ArchitectureError: if the model class cannot be imported or rebuilt.
        distill.errors.ConfigError: if ``map_location`` is not a device, or not one this machine has.
    """
    device = _device(map_location)
    state, header = load_compressed_state_dict(path)
    arch = header["arch"] if isinstance(header["arch"], Mapping) else {}
    what = f"{path}: cannot rebuild the stored architecture {arch.get('class_path', '?')}"
    try:
        model = build_module(header["arch"])
    except ArchitectureError as err:
        if isinstance(err.__cause__, TypeError) and not arch.get("init_args"):  # constructor arguments not recorded
            raise RebuildError(f"{what}: {err} (the file records no constructor arguments). "
                               f"{_rebuild_fix(path, arch)}") from err
        raise
    mismatch = _shape_mismatch(state, model)
    if mismatch is not None:
        args = arch.get("init_args") or {}
        raise RebuildError(
            f"{what} with init_args {args} into a model whose shapes match the file ({mismatch}); "
            f"{'it was probably built with other constructor arguments than its defaults. ' if not args else ''}"
            f"{_rebuild_fix(path, arch)}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise RebuildError(f"{what}: its tensors do not load into the rebuilt model ({first}). "
                           f"{_rebuild_fix(path, arch)}") from err
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:  # e.g. "Torch not compiled with CUDA enabled"
        raise ConfigError(
            f"map_location={map_location!r}: cannot move the model there ({first_line(err)}). Fix: pass "
            "map_location='cpu' or a device this machine has"
        ) from err
    return model.eval()
