"""The fused CUDA prior kernel alone over VGG19-BN's 38.9M weights, for each tile setting (distill/prior_cuda.py).

Times ``distill.prior_cuda.accumulate`` over every compressed weight tensor of a freshly initialised VGG19-BN on the
GPU (J = 16 components, a fixed mixture), for weights-per-iteration x warps x programs-per-SM settings; prints one
line per setting (median of 15 after a warm-up) and, last, the fastest as ``block,warps,waves`` (the form
``DISTILL_PRIOR_CUDA_TILE`` takes). The shipped default is the fastest of session 18's sweep on an H100.

    python benchmarks/bench_prior_cuda_tiles.py            # needs a CUDA GPU with Triton
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import prior_cuda  # noqa: E402
from distill.priors import _component_log_terms  # noqa: E402
from models.vgg import VGG19BN  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_prior_cuda_tiles.py needs a CUDA GPU")
    dev = torch.device("cuda")
    model = VGG19BN().to(dev)
    ws = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    gs = [torch.zeros_like(p) for p in ws]
    k = 17
    means = torch.linspace(-0.2, 0.2, k, dtype=torch.float64)
    means[0] = 0
    lp = torch.full((k,), 2 * math.log(1 / 0.02), dtype=torch.float64)
    lpi = torch.log_softmax(torch.zeros(k, dtype=torch.float64), 0)
    const, prec = _component_log_terms(means, lp, lpi)
    comp = prior_cuda.components(means, prec, const, dev)
    out = torch.zeros(1 + 3 * k, dtype=torch.float64, device=dev)

    def run() -> None:
        for w, g in zip(ws, gs, strict=True):
            prior_cuda.accumulate(w, g, comp, out, 1e-7)

    n = sum(w.numel() for w in ws)
    res = []
    for block, warps, waves in itertools.product((32, 64, 128), (1, 2, 4), (4, 8)):
        prior_cuda._BLOCK, prior_cuda._WARPS, prior_cuda._WAVES = block, warps, waves
        try:
            run()
            torch.cuda.synchronize()
            ts = []
            for _ in range(15):
                torch.cuda.synchronize()
                t = time.perf_counter()
                run()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            ms = sorted(ts)[len(ts) // 2] * 1e3
        except Exception as err:  # a setting the compiler or the GPU refuses: reported, skipped
            ms = float("nan")
            print(f"block {block} warps {warps} waves {waves}: failed ({err})", file=sys.stderr)
        res.append((ms, block, warps, waves))
        print(f"block {block} warps {warps} waves {waves}: {ms:.3f} ms for {n} weights", file=sys.stderr, flush=True)
    best = sorted(r for r in res if r[0] == r[0])
    print("best", best[:3], file=sys.stderr)
    print(f"{best[0][1]},{best[0][2]},{best[0][3]}")


if __name__ == "__main__":
    main()
