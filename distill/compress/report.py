"""Size report of a compressed file: the per-layer table of Deep Compression and the totals.

Per layer (as tabulated by Han, Mao & Dally, "Deep Compression", and Ullrich, Meeds & Welling, "Soft Weight-Sharing
for Neural Network Compression"): shape, parameters, non-zeros, sparsity, bits per non-zero weight spent on its
cluster code and on its index (Huffman-coded, padding entries included), and the bytes the layer takes in the file.

Totals: ``compression_rate = dense float32 bytes of all parameters / bytes of the file as written``. Two reference
sizes make the entropy coder's effect visible; both keep the file's container (header, raw tensors, codebooks) and
replace only the coded streams and their Huffman tables:

* ``analytic_bytes``: fixed-width codes, ``index_bits + ceil(log2(codebook + 1))`` bits per stored entry;
* ``entropy_bound_bytes``: the empirical entropy of each stream (no table), the best any symbol-wise coder can do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.compress.fileformat import HUFFMAN_SPARSE, load_compressed_state_dict
from distill.compress.huffman import entropy_bits
from distill.compress.sparse import stream_counts
from distill.io import atomic_write_json, atomic_write_text

__all__ = ["TensorStats", "build_report", "compression_report", "report_markdown", "write_report"]


@dataclass(frozen=True)
class TensorStats:
    """What the report needs to know about one stored tensor."""

    name: str
    shape: tuple[int, ...]
    param: bool  # an nn.Parameter (counted in the dense size) rather than a buffer
    compressed: bool
    nonzero: int
    record_bytes: int  # bytes of the tensor's record in the payload
    itemsize: int = 4
    entries: int = 0  # stored entries (non-zeros + padding)
    codebook: int = 0  # non-zero shared values
    index_bits: int = 0
    code_bits: int = 0  # Huffman payload bits of the cluster codes
    gap_bits: int = 0  # Huffman payload bits of the index gaps
    stream_bytes: int = 0  # bytes of both coded streams with their length tables and sync offsets
    code_entropy_bits: float = 0.0  # entries * H(codes)
    gap_entropy_bits: float = 0.0  # entries * H(gaps)

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def _row(s: TensorStats) -> dict[str, Any]:
    n = s.params
    row: dict[str, Any] = {
        "name": s.name,
        "shape": list(s.shape),
        "params": n,
        "nonzero": s.nonzero,
        "sparsity": 1.0 - s.nonzero / n if n else 0.0,
        "bits_per_weight": (s.code_bits / s.nonzero if s.nonzero else 0.0) if s.compressed else 8.0 * s.itemsize,
        "bits_per_index": (s.gap_bits / s.nonzero if s.nonzero else 0.0) if s.compressed else 0.0,
        "bytes": s.record_bytes,
    }
    if s.compressed:
        row.update({"index_bits": s.index_bits, "codebook": s.codebook, "entries": s.entries})
    return row


def _fixed_width_bytes(s: TensorStats) -> float:
    return s.entries * (s.index_bits + math.ceil(math.log2(s.codebook + 1))) / 8.0


def build_report(stats: Sequence[TensorStats], file_bytes: int) -> dict[str, Any]:
    """The report dictionary (``layers`` = compressed weights, ``uncompressed`` = the rest, ``totals``)."""
    weights = [s for s in stats if s.compressed]
    others = [s for s in stats if not s.compressed]
    total_params = sum(s.params for s in stats if s.param)
    total_weights = sum(s.params for s in weights)
    zero = total_weights - sum(s.nonzero for s in weights)
    dense = 4 * total_params
    coded = sum(s.stream_bytes for s in weights)
    analytic = file_bytes - coded + sum(math.ceil(_fixed_width_bytes(s)) for s in weights)
    bound = file_bytes - coded + sum((s.code_entropy_bits + s.gap_entropy_bits) / 8.0 for s in weights)
    totals = {
        "total_params": total_params,
        "total_weights": total_weights,
        "zero_weights": zero,
        "zero_rate": zero / total_weights if total_weights else 0.0,
        "nonzero_fraction": 1.0 - zero / total_weights if total_weights else 0.0,
        "dense_bytes": dense,
        "file_bytes": file_bytes,
        "compression_rate": dense / file_bytes if file_bytes else 0.0,
        "analytic_bytes": analytic,
        "entropy_bound_bytes": bound,
    }
    return {
        "layers": [_row(s) for s in weights],
        "uncompressed": {
            "tensors": len(others),
            "params": sum(s.params for s in others if s.param),
            "bytes": sum(s.record_bytes for s in others),
            "values": sum(s.params for s in others),
        },
        "totals": totals,
    }


def compression_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Report on a compressed file, from the file alone (streams re-counted from the decoded tensors)."""
    state, header = load_compressed_state_dict(path)
    stats = []
    for rec in header["tensors"]:
        t = state[rec["name"]]
        flat = t.reshape(-1).numpy()
        nz = int(np.count_nonzero(flat))
        common = {
            "name": rec["name"],
            "shape": tuple(rec["shape"]),
            "param": bool(rec["param"]),
            "nonzero": nz,
            "record_bytes": int(rec["length"]),
            "itemsize": t.element_size(),
        }
        if rec["encoding"] != HUFFMAN_SPARSE:
            stats.append(TensorStats(compressed=False, **common))
            continue
        positions = np.flatnonzero(flat)
        values = flat[positions]
        codebook = np.unique(values)
        codes = np.searchsorted(codebook, values) + 1
        gc, cc = stream_counts(positions, codes, int(rec["index_bits"]))
        cb_bytes = 2 if rec.get("codebook_dtype") == "float16" else 4
        stream_bytes = int(rec["length"]) - cb_bytes * int(rec["codebook"])  # tables, sync offsets and coded bits
        stats.append(
            TensorStats(
                compressed=True,
                entries=int(rec["entries"]),
                codebook=int(rec["codebook"]),
                index_bits=int(rec["index_bits"]),
                code_bits=int(rec["code_bits"]),
                gap_bits=int(rec["gap_bits"]),
                stream_bytes=stream_bytes,
                code_entropy_bits=entropy_bits(cc),
                gap_entropy_bits=entropy_bits(gc),
                **common,
            )
        )
    report = build_report(stats, int(header["file_bytes"]))
    report["file"] = str(path)
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table plus totals."""
    lines = [
        "| layer | shape | params | non-zero | sparsity | bits/weight | bits/index | bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["layers"]:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"| {r['name']} | {shape} | {r['params']:,} | {r['nonzero']:,} | {100 * r['sparsity']:.2f}% "
            f"| {r['bits_per_weight']:.2f} | {r['bits_per_index']:.2f} | {r['bytes']:,} |"
        )
    u = report["uncompressed"]
    bits = 8.0 * u["bytes"] / u["values"] if u.get("values") else 32.0
    lines.append(f"| other ({u['tensors']} raw tensors) | | {u['params']:,} | | | {bits:.0f} | | {u['bytes']:,} |")
    t = report["totals"]
    lines += [
        "",
        f"- total parameters: {t['total_params']:,}; compressed weights: {t['total_weights']:,}; "
        f"zero weights: {t['zero_weights']:,} ({100 * t['zero_rate']:.2f}%, "
        f"non-zero {100 * t['nonzero_fraction']:.2f}%)",
        f"- dense float32: {t['dense_bytes']:,} bytes; file: {t['file_bytes']:,} bytes; "
        f"**compression rate {t['compression_rate']:.1f}x**",
        f"- without Huffman (fixed-width codes and indices): {t['analytic_bytes']:,} bytes; "
        f"entropy bound: {t['entropy_bound_bytes']:,.0f} bytes",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    report: dict[str, Any], folder: str | os.PathLike[str], stem: str = "compression_report"
) -> dict[str, Path]:
    """Write ``{stem}.json`` and ``{stem}.md`` atomically into ``folder``; returns both paths."""
    folder = Path(folder)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md"}
    atomic_write_json(paths["json"], report, indent=2)
    atomic_write_text(paths["md"], report_markdown(report))
    return paths
