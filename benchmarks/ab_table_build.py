"""A/B of the soft weight-sharing prior's table build against another checkout's, interleaved in one process.

The table (``distill.prior_kernels.build_table``) is rebuilt every training step from the mixture; this times this
checkout's build and a baseline checkout's on the same mixture and grid, alternately, with warm caches and right
after a 32 MB pass has evicted them (as a backward pass does in the step). The baseline is any older checkout, e.g.

    git worktree add /tmp/base cf02cdc
    python benchmarks/ab_table_build.py --baseline /tmp/base --trained runs/lenet300_100_sws/checkpoints/last.ckpt
    python benchmarks/ab_table_build.py --baseline /tmp/base --threads 2

Prints one JSON line: grid points, components carried per point (this checkout), median microseconds per variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_prior import setup, trained_state  # noqa: E402

from distill import prior_kernels  # noqa: E402
from distill.priors import MixtureTable  # noqa: E402
from models.lenet import LeNet300100  # noqa: E402


def load_baseline(checkout: Path) -> ModuleType:
    path = checkout / "distill" / "prior_kernels.py"
    if not path.is_file():
        raise SystemExit(f"--baseline {checkout}: no distill/prior_kernels.py there (a checkout of this repository)")
    spec = importlib.util.spec_from_file_location("baseline_prior_kernels", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of this repository")
    parser.add_argument("--trained", help="a distill fit checkpoint with a GMMPrior (its narrow mixture)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline)

    model = LeNet300100()
    state = trained_state(args.trained) if args.trained else None
    if state is not None:
        model.load_state_dict(state[0])
    cb, weights = setup(model, torch.device("cpu"))
    if state is not None:
        cb.mixture.load_state_dict(state[1])
    lo = min(float(w.detach().min()) for w in weights)
    hi = max(float(w.detach().max()) for w in weights)
    means, lp, lpi, _ = cb.mixture._host_mixture()
    table = MixtureTable(means, lp, lpi, lo, hi, spacing=cb.grid_spacing, workspace={})  # the grid the step uses
    prec, const, _ = prior_kernels.component_terms(lp, lpi)
    n, k1, subbins = table.size, means.shape[0], table.subbins

    def buffers() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # kept across calls, as the callback's workspace keeps them; big enough for either layout (an older build
        # takes the first two)
        return (np.empty((n - 1) * subbins * 2, np.float32),
                np.empty(max(n * (2 + k1), prior_kernels.stats_length(n, k1))),
                np.empty(prior_kernels.blocks(n) * (1 + k1), np.int32))

    out_this, out_base = buffers(), buffers()
    variants = {
        "this": lambda: prior_kernels.build_table(means, prec, const, table.lo, table.h, n, subbins, out_this),
        "baseline": lambda: baseline.build_table(means, prec, const, table.lo, table.h, n, subbins, out_base),
    }
    junk = np.ones(8 << 20, np.float32)
    times: dict[str, list[float]] = {}
    for f in variants.values():
        f()
        f()
    for _ in range(args.reps):
        for cold in (False, True):
            for name, f in variants.items():
                if cold:
                    junk += 1.0
                else:
                    f()  # its own data back in the caches (the variant before it may have evicted them)
                start = time.perf_counter()
                f()
                times.setdefault(f"{name}_{'cold' if cold else 'warm'}_us", []).append(time.perf_counter() - start)
    result: dict[str, object] = {
        "mixture": "trained" if state is not None else "fresh", "threads": args.threads, "grid_points": n,
        "components_per_point": round(float(table._active[:, 0].mean()), 2) if table.fused else None,
    }
    result.update({k: round(float(np.median(v)) * 1e6, 1) for k, v in times.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
