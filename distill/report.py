"""``distill report RUN_DIR [--out DIR]``: every figure a run's outputs allow, and a Markdown summary.

A run folder is what ``distill fit`` leaves in ``trainer.log_dir`` (``runs/<name>/version_N``): ``hparams.yaml``,
``config.yaml``, TensorBoard events, and the artifacts the callbacks wrote (``gmm_history.json``,
``gmm_weights.npz``, ``pruning_history.json``, ``compression_report.json``, ``accuracy.json``,
``figure_weights.npz``). :func:`load_run` reads them, :func:`run_figures` draws what they allow (the same function
renders the figures of :class:`distill.callbacks.FigureLogger` at the end of a fit) and :func:`summary_markdown`
writes the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from distill import plots
from distill.errors import DistillError
from distill.io import atomic_write_text  # re-exported: the public name predates distill.io

__all__ = [
    "ARTIFACTS",
    "FIGURES",
    "NotARunError",
    "RunArtifacts",
    "atomic_write_text",
    "load_run",
    "main",
    "read_scalars",
    "run_accuracy_loss",
    "run_figures",
    "summary_markdown",
    "write_report",
]

# Files that make a folder a run (besides TensorBoard events).
ARTIFACTS = (
    "hparams.yaml",
    "config.yaml",
    "gmm_history.json",
    "gmm_weights.npz",
    "pruning_history.json",
    "compression_report.json",
    "accuracy.json",
    "figure_weights.npz",
)

# Figure name -> number in the issue; PNGs are written as fig{N}_{name}.png, TensorBoard tags figures/{name}.
FIGURES: dict[str, int] = {
    "weight_change": 1,
    "mixture_dynamics": 2,
    "prior_scatter": 3,
    "filters": 4,
    "compression": 5,
    "hyperprior": 6,
    "accuracy_vs_compression": 7,
}


class NotARunError(DistillError, ValueError):
    """The folder given is not the output folder of a ``distill fit`` run."""


@dataclass
class RunArtifacts:
    """Everything read from a run folder; a missing file is None (or empty)."""

    run_dir: Path
    hparams: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    gmm_history: dict[str, Any] | None = None
    gmm_weights: dict[str, np.ndarray] | None = None
    pruning_history: dict[str, Any] | None = None
    compression_report: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    figure_weights: dict[str, np.ndarray] | None = None
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def last_scalar(self, tag: str) -> float | None:
        """The last logged value of a TensorBoard scalar, or None."""
        values = self.scalars.get(tag)
        return values[-1][1] if values else None


def _has_events(folder: Path) -> bool:
    return any(folder.glob("events.out.tfevents.*"))


def _is_run(folder: Path) -> bool:
    return _has_events(folder) or any((folder / name).is_file() for name in ARTIFACTS)


def resolve_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The run folder to read: ``run_dir`` itself, or its latest ``version_N`` when given ``runs/<name>``.

    Raises:
        NotARunError: if the folder does not exist or holds no run outputs.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise NotARunError(f"run folder {str(folder)!r} {what} (expected e.g. runs/<name>/version_0)")
    if _is_run(folder):
        return folder
    versions = sorted(
        (p for p in folder.glob("version_*") if p.is_dir() and _is_run(p)),
        key=lambda p: int(p.name.split("_", 1)[1]) if p.name.split("_", 1)[1].isdigit() else -1,
    )
    if versions:
        return versions[-1]
    raise NotARunError(
        f"{str(folder)!r} is not a run folder: expected hparams.yaml, a TensorBoard events file or distill artifacts "
        f"({', '.join(ARTIFACTS[2:])}); pass the folder `distill fit` printed, e.g. runs/<name>/version_0"
    )


def read_scalars(run_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars of a run folder as ``tag -> [(step, value), ...]`` (empty without events)."""
    folder = Path(run_dir)
    if not _has_events(folder):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError:  # hparams.yaml may hold python tags from foreign modules: not needed here
            return None
    return data if isinstance(data, dict) else None


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def load_run(run_dir: str | os.PathLike[str], *, scalars: bool = True) -> RunArtifacts:
    """Read a run folder's artifacts (and its TensorBoard scalars unless ``scalars=False``).

    Raises:
        NotARunError: if the folder is not a run (see :func:`resolve_run_dir`).
    """
    folder = resolve_run_dir(run_dir)
    return RunArtifacts(
        run_dir=folder,
        hparams=_read_yaml(folder / "hparams.yaml"),
        config=_read_yaml(folder / "config.yaml"),
        gmm_history=_read_json(folder / "gmm_history.json"),
        gmm_weights=_read_npz(folder / "gmm_weights.npz"),
        pruning_history=_read_json(folder / "pruning_history.json"),
        compression_report=_read_json(folder / "compression_report.json"),
        accuracy=_read_json(folder / "accuracy.json"),
        figure_weights=_read_npz(folder / "figure_weights.npz"),
        scalars=read_scalars(folder) if scalars else {},
    )


# -------------------------------------------------------------------------------------------------------------------
# accuracies
# -------------------------------------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def accuracy_table(run: RunArtifacts, original: float | None = None) -> dict[str, tuple[float | None, str]]:
    """The four accuracies of a compression run with where each comes from.

    * original: ``original`` if given, else ``accuracy.json["original"]``;
    * retrained: ``accuracy.json["before"]`` (test accuracy before compression), else the last ``test/acc`` and
      then ``val/acc`` scalar;
    * pruned and quantized: ``accuracy.json["quantized"]``; decoded from file: ``accuracy.json["decoded"]``.

    Returns:
        ``label -> (accuracy in [0, 1] or None, source)``.
    """
    acc = run.accuracy or {}
    table: dict[str, tuple[float | None, str]] = {}
    if original is not None:
        table["original"] = (original, "--original-acc")
    else:
        table["original"] = (_num(acc.get("original")), "accuracy.json")
    retrained = _num(acc.get("before"))
    source = "accuracy.json (test)"
    if retrained is None:
        for tag in ("test/acc", "val/acc"):
            retrained = _num(run.last_scalar(tag))
            source = f"last {tag} (TensorBoard)"
            if retrained is not None:
                break
    table["retrained"] = (retrained, source)
    table["pruned and quantized"] = (_num(acc.get("quantized")), "accuracy.json (test, in memory)")
    table["decoded from file"] = (_num(acc.get("decoded")), "accuracy.json (test, decoded file)")
    return table


def run_accuracy_loss(run: RunArtifacts, original: float | None = None) -> float | None:
    """Accuracy lost by compression in percentage points: reference (original, else retrained) minus the
    compressed accuracy (decoded, else quantized); None when either is unknown."""
    table = accuracy_table(run, original)
    reference = table["original"][0] if table["original"][0] is not None else table["retrained"][0]
    compressed = table["decoded from file"][0]
    if compressed is None:
        compressed = table["pruned and quantized"][0]
    if reference is None or compressed is None:
        return None
    return 100.0 * (reference - compressed)


def _compression_rate(run: RunArtifacts) -> float | None:
    return _num(((run.compression_report or {}).get("totals") or {}).get("compression_rate"))


# -------------------------------------------------------------------------------------------------------------------
# figures
# -------------------------------------------------------------------------------------------------------------------
def _weights_pair(run: RunArtifacts) -> tuple[np.ndarray, np.ndarray] | None:
    for source in (run.gmm_weights, run.figure_weights):
        if source and "initial" in source and "final" in source and source["initial"].size == source["final"].size:
            return source["initial"], source["final"]
    return None


def run_label(run_dir: Path) -> str:
    """A short label for a run folder: ``<name>/version_N`` -> ``<name> vN``, else the folder's name."""
    if run_dir.name.startswith("version_"):
        return f"{run_dir.parent.name} v{run_dir.name.removeprefix('version_')}"
    return run_dir.name


def run_figures(run: RunArtifacts, *, original: float | None = None) -> dict[str, Figure]:
    """Draw every figure the run's artifacts allow, keyed by the names of :data:`FIGURES`.

    A figure whose data is malformed is skipped with a warning (a report shows what it can).
    """
    figures: dict[str, Figure] = {}
    title = run_label(run.run_dir)

    def attempt(name: str, build: Any) -> None:
        try:
            figures[name] = build()
        except (KeyError, ValueError, TypeError, IndexError) as err:
            warnings.warn(f"figure {name!r} skipped for {run.run_dir}: {err}", stacklevel=3)

    pair = _weights_pair(run)
    history = run.gmm_history
    if pair is not None:
        attempt("weight_change", lambda: plots.weight_change_figure(*pair, title=title))
    if history and history.get("means"):
        attempt("mixture_dynamics", lambda: plots.mixture_dynamics_figure(history))
        if pair is not None:

            def prior() -> Figure:
                assert history is not None and pair is not None
                return plots.prior_scatter_figure(
                    *pair, history["means"][-1], history["stds"][-1], history["pis"][-1], title=title
                )

            attempt("prior_scatter", prior)
    fw = run.figure_weights
    if fw and "layer_before" in fw and "layer_after" in fw:
        name = str(fw["layer_name"]) if "layer_name" in fw else None
        attempt("filters", lambda: plots.filters_figure(fw["layer_before"], fw["layer_after"], title=name))
    layers = (run.compression_report or {}).get("layers")
    iterations = (run.pruning_history or {}).get("iterations")
    if layers or iterations:
        attempt("compression", lambda: plots.compression_figure(run.compression_report, run.pruning_history))
    if history and history.get("hyperprior"):
        attempt("hyperprior", lambda: plots.hyperprior_figure(history["hyperprior"]))
    loss, rate = run_accuracy_loss(run, original), _compression_rate(run)
    if loss is not None and rate is not None:
        attempt("accuracy_vs_compression", lambda: plots.pareto_figure([(title, loss, rate)]))
    return figures


def figure_filename(name: str) -> str:
    """``fig{N}_{name}.png`` for a name of :data:`FIGURES`."""
    return f"fig{FIGURES[name]}_{name}.png"


# -------------------------------------------------------------------------------------------------------------------
# summary
# -------------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec) if spec else str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def summary_markdown(run: RunArtifacts, figures: Mapping[str, str] | None = None, original: float | None = None) -> str:
    """The run's Markdown summary: accuracy table, compression rate, per-layer table, mixture, figures.

    Args:
        run: the loaded run.
        figures: figure name -> path relative to the summary, to embed.
        original: accuracy of the original network, if known from elsewhere.
    """
    lines = [f"# Run report: `{run.run_dir}`", ""]
    lines += ["## Accuracy", "", "| model | test accuracy | source |", "|---|---:|---|"]
    for label, (value, source) in accuracy_table(run, original).items():
        lines.append(f"| {label} | {_pct(value)} | {source if value is not None else '-'} |")
    loss = run_accuracy_loss(run, original)
    if loss is not None:
        lines += ["", f"Accuracy loss: {loss:.2f} percentage points."]
    report = run.compression_report
    lines += ["", "## Compression", ""]
    if report:
        totals = report.get("totals", {})
        lines.append(
            f"Compression rate: **{_fmt(_num(totals.get('compression_rate')), '.1f')}x** "
            f"({_fmt(totals.get('dense_bytes'), ',')} dense bytes -> {_fmt(totals.get('file_bytes'), ',')} bytes in "
            f"the file); zero weights: {_pct(_num(totals.get('zero_rate')))} of "
            f"{_fmt(totals.get('total_weights'), ',')} compressed weights ({_fmt(totals.get('total_params'), ',')} "
            "parameters in all)."
        )
        lines += [
            "",
            "| layer | shape | parameters | non-zero | sparsity | bits/weight | bits/index | bytes |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for layer in report.get("layers", []):
            shape = "x".join(str(s) for s in layer.get("shape", []))
            lines.append(
                f"| {layer.get('name')} | {shape} | {_fmt(layer.get('params'), ',')} "
                f"| {_fmt(layer.get('nonzero'), ',')} "
                f"| {_pct(_num(layer.get('sparsity')))} | {_fmt(_num(layer.get('bits_per_weight')), '.2f')} "
                f"| {_fmt(_num(layer.get('bits_per_index')), '.2f')} | {_fmt(layer.get('bytes'), ',')} |"
            )
    else:
        lines.append("No compression report in this run (compression rate 1x).")
    if run.pruning_history and run.pruning_history.get("iterations"):
        lines += [
            "",
            "## Pruning iterations",
            "",
            "| iteration | epoch | zero rate | val acc |",
            "|---:|---:|---:|---:|",
        ]
        for it in run.pruning_history["iterations"]:
            lines.append(
                f"| {it.get('iteration')} | {it.get('epoch')} | {_pct(_num(it.get('zero_rate')))} "
                f"| {_pct(_num(it.get('val_acc')))} |"
            )
    history = run.gmm_history
    if history and history.get("means"):
        start, end = len(history["means"][0]), len(history["means"][-1])
        sig = history.get("significant") or []
        nonzero = history.get("nonzero") or []
        merged = (history.get("merged") or {}).get("means")
        prior_loss = history.get("prior_loss") or []
        lines += ["", "## Mixture prior", ""]
        lines.append(
            f"{start} components at the start"
            + (f", {sig[0]} -> {sig[-1]} significant" if sig else "")
            + (f", {len(merged)} after merging" if merged else "")
            + (f"; {_pct(nonzero[0])} -> {_pct(nonzero[-1])} of the weights off the zero component" if nonzero else "")
            + (f"; final prior loss {_fmt(_num(prior_loss[-1]), '.4g')}" if prior_loss else "")
            + (f" ({end} components in the last record)." if end != start else ".")
        )
    if run.scalars:
        lines += ["", "## Last logged metrics", "", "| metric | value |", "|---|---:|"]
        for tag in sorted(run.scalars):
            shown = tag.split("/", 1)[0] in {"train", "val", "test", "compress", "prune"}
            if shown or tag in {"gmm/significant", "gmm/nonzero"}:
                lines.append(f"| {tag} | {_fmt(run.last_scalar(tag), '.4g')} |")
    if figures:
        lines += ["", "## Figures", ""]
        for name, rel in figures.items():
            lines += [f"![figure {FIGURES.get(name, '')}: {name}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *, original: float | None = None
) -> dict[str, Path]:
    """Write every figure the run allows (``fig{N}_{name}.png``) and ``summary.md`` into ``out_dir``.

    Args:
        run_dir: the run folder (or ``runs/<name>``: its latest version).
        out_dir: where to write; default ``<run folder>/report``.
        original: accuracy of the original network, for the accuracy table.

    Returns:
        ``name -> path`` of each file written (figure names and ``"summary"``).

    Raises:
        NotARunError: if ``run_dir`` is not a run folder.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    written: dict[str, Path] = {}
    rel: dict[str, str] = {}
    for name, fig in run_figures(run, original=original).items():
        written[name] = plots.save_figure(fig, out / figure_filename(name))
        rel[name] = figure_filename(name)
    written["summary"] = atomic_write_text(out / "summary.md", summary_markdown(run, rel, original))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``distill report RUN_DIR [--out DIR] [--original-acc ACC]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="distill report",
        description="Write the figures a run's outputs allow and a Markdown summary (summary.md).",
    )
    parser.add_argument("run_dir", help="the run folder printed by `distill fit` (runs/<name>/version_N)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument(
        "--original-acc", type=float, default=None, help="test accuracy of the original network, in [0, 1]"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.original_acc is not None and not 0.0 <= args.original_acc <= 1.0:
        parser.error(f"--original-acc must be an accuracy in [0, 1], got {args.original_acc}")
    try:
        written = write_report(args.run_dir, args.out, original=args.original_acc)
    except NotARunError as err:
        print(f"distill report: error: {err}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name + ':':<26} {path}")
    return 0
