"""Small but realistic run folders, written with the artifact schemas of the contract (HELPERS.md), so the figure,
report and sweep tests do not need the callbacks that write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = [("fc1", (32, 64)), ("fc2", (10, 32))]
J = 5  # non-zero components; the history holds J + 1 per record
EPOCHS = 4


def gmm_history(seed: int = 0) -> dict[str, Any]:
    """A mixture history: records at fit start and each epoch end, components shrinking towards the zero one."""
    rng = np.random.default_rng(seed)
    means0 = np.concatenate([[0.0], np.linspace(-0.4, 0.4, J)])
    means, stds, pis, sig = [], [], [], []
    for r in range(EPOCHS + 1):
        shrink = 1.0 - 0.15 * r
        means.append((means0 * shrink + rng.normal(0, 0.005, J + 1) * (np.arange(J + 1) > 0)).tolist())
        stds.append((np.full(J + 1, 0.05) * shrink + 0.01).tolist())
        p = np.concatenate([[0.5 + 0.1 * r], np.full(J, (0.5 - 0.1 * r) / J)])
        pis.append((p / p.sum()).tolist())
        sig.append(int(J + 1 - r))
    return {
        "epochs": list(range(-1, EPOCHS)),
        "steps": [10 * (r) for r in range(EPOCHS + 1)],
        "means": means,
        "stds": stds,
        "pis": pis,
        "prior_loss": [float(100 - 10 * r) for r in range(EPOCHS + 1)],
        "significant": sig,
        "nonzero": [1.0 - 0.1 * r for r in range(EPOCHS + 1)],
        "hyperprior": {
            "gamma": {"alpha": 250.0, "beta": 0.1},
            "gamma_zero": {"alpha": 5000.0, "beta": 2.0},
            "beta": {"alpha": 5.0, "beta": 2.0},
        },
        "merged": {"means": [0.0, -0.2, 0.2], "stds": [0.02, 0.03, 0.03], "pis": [0.9, 0.05, 0.05]},
    }


def compression_report(rate: float = 24.5) -> dict[str, Any]:
    layers = []
    for i, (name, shape) in enumerate(LAYERS):
        params = int(np.prod(shape))
        nonzero = params // (5 + 3 * i)
        layers.append(
            {
                "name": f"{name}.weight",
                "shape": list(shape),
                "params": params,
                "nonzero": nonzero,
                "sparsity": 1 - nonzero / params,
                "bits_per_weight": 3.0 - i * 0.5,
                "bits_per_index": 4.0 + i,
                "bytes": nonzero,
            }
        )
    total = sum(layer["params"] for layer in layers)
    zeros = sum(layer["params"] - layer["nonzero"] for layer in layers)
    return {
        "layers": layers,
        "totals": {
            "total_params": total + 42,
            "total_weights": total,
            "zero_weights": zeros,
            "zero_rate": zeros / total,
            "nonzero_fraction": 1 - zeros / total,
            "dense_bytes": 4 * (total + 42),
            "file_bytes": int(4 * (total + 42) / rate),
            "compression_rate": rate,
            "analytic_bytes": 300,
            "entropy_bound_bytes": 250,
        },
    }


def pruning_history() -> dict[str, Any]:
    return {
        "iterations": [
            {
                "iteration": i,
                "epoch": 2 * i,
                "step": 20 * i,
                "threshold": {"fc1.weight": 0.01 * i, "fc2.weight": 0.02 * i},
                "sparsity": {"fc1.weight": 0.2 * i, "fc2.weight": 0.1 * i},
                "zero_rate": 0.18 * i,
                "val_acc": None if i == 0 else 0.95 - 0.01 * i,
            }
            for i in range(4)
        ]
    }


def write_scalars(folder: Path, scalars: dict[str, list[float]]) -> None:
    """A real TensorBoard event file with the given scalar series (steps 0, 1, ...)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, values in scalars.items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, step)
    writer.close()


def write_run(
    folder: Path,
    *,
    gmm: bool = True,
    compress: bool = True,
    pruning: bool = True,
    accuracy: dict[str, Any] | None = None,
    scalars: dict[str, list[float]] | None = None,
    rate: float = 24.5,
) -> Path:
    """Write a run folder like `distill fit` with GMMPrior + MagnitudePruning + PruneQuantize + FigureLogger would."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hparams.yaml").write_text("num_classes: 10\n")
    rng = np.random.default_rng(1)
    n = sum(int(np.prod(s)) for _, s in LAYERS)
    initial = rng.normal(0, 0.1, n).astype(np.float32)
    final = np.where(np.abs(initial) < 0.05, 0.0, np.sign(initial) * 0.2).astype(np.float32)
    if gmm:
        (folder / "gmm_history.json").write_text(json.dumps(gmm_history()))
        np.savez(folder / "gmm_weights.npz", initial=initial, final=final, quantized=final)
    if compress:
        (folder / "compression_report.json").write_text(json.dumps(compression_report(rate)))
        acc = accuracy if accuracy is not None else {"before": 0.96, "quantized": 0.955, "decoded": 0.955}
        (folder / "accuracy.json").write_text(json.dumps(acc))
    if pruning:
        (folder / "pruning_history.json").write_text(json.dumps(pruning_history()))
    conv_before = rng.normal(0, 0.3, (6, 1, 5, 5)).astype(np.float32)
    np.savez(
        folder / "figure_weights.npz",
        initial=initial,
        final=final,
        layer_before=conv_before,
        layer_after=np.round(conv_before * 2) / 2,
        layer_name=np.array("conv1.weight"),
    )
    write_scalars(
        folder,
        scalars
        if scalars is not None
        else {"train/loss": [2.0, 1.0, 0.5], "val/acc": [0.8, 0.9, 0.93], "test/acc": [0.94]},
    )
    return folder
