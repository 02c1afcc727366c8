"""Encode/decode speed and file size of the Deep Compression file format.

Each model (freshly initialised) is pruned to ``--sparsity`` per layer and k-means-shared (8 bits conv, 5 bits
dense, as in Han et al.), then written with :func:`distill.compress.save_compressed` and read back. Prints a Markdown
table (times are the best of ``--repeat`` runs, single thread).

    python -m benchmarks.bench_compress                 # LeNet5Caffe and VGG19BN (width 1)
    python -m benchmarks.bench_compress --models LeNet5Caffe --repeat 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distill.compress import compression_report, load_compressed, load_compressed_state_dict, quantize_model
from distill.compress.fileformat import save_compressed
from models import VGG19BN, LeNet5Caffe, LeNet300100

MODELS = {"LeNet300100": LeNet300100, "LeNet5Caffe": LeNet5Caffe, "VGG19BN": VGG19BN}


def best_of(repeat: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["LeNet5Caffe", "VGG19BN"], choices=sorted(MODELS))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = MODELS[name]().eval()
            n_params = sum(p.numel() for p in model.parameters())
            t = time.perf_counter()
            quantize_model(model, bits_conv=8, bits_fc=5, sparsity=args.sparsity)
            t_quant = time.perf_counter() - t
            path = Path(tmp) / f"{name}.dstl"
            t_enc = best_of(args.repeat, lambda: save_compressed(model, path))  # noqa: B023
            t_dec = best_of(args.repeat, lambda: load_compressed_state_dict(path))  # noqa: B023
            t_load = best_of(args.repeat, lambda: load_compressed(path))  # noqa: B023
            loaded = load_compressed(path)
            exact = all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
            tot = compression_report(path)["totals"]
            rows.append(
                f"| {name} | {n_params:,} | {100 * tot['zero_rate']:.1f}% | {t_quant:.2f} | {t_enc:.3f} | {t_dec:.3f} "
                f"| {t_load:.3f} | {tot['file_bytes']:,} | {tot['analytic_bytes']:,} "
                f"| {tot['entropy_bound_bytes']:,.0f} "
                f"| {tot['compression_rate']:.1f}x | {exact} |"
            )
    print(
        "| model | params | zero weights | k-means s | encode s | decode s | load (rebuild) s | file bytes "
        "| fixed-width bytes | entropy bound bytes | rate | exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
