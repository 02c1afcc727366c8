"""Render the run's figures at the end of a fit: TensorBoard images and PNG files.

The callback knows nothing about the LightningModule: it snapshots the compressible weights (``weight`` of every
``nn.Linear`` / ``nn.Conv2d``) when the fit starts and when it ends, writes them to ``figure_weights.npz`` in the run
folder, and then draws every figure the run folder's artifacts allow (see :func:`distill.report.run_figures`): the
mixture's dynamics from ``gmm_history.json``, the compression per layer from ``compression_report.json``, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from typing_extensions import override

from distill import plots
from distill.compress.params import compressible_parameters, network_of
from distill.io import atomic_savez, run_folder

__all__ = ["FigureLogger", "default_compressible_parameters"]


def default_compressible_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters compressed by default (:func:`distill.compress.params.compressible_parameters`)."""
    return dict(compressible_parameters(module))


class FigureLogger(Callback):
    """At the end of a fit, draw the figures of the run and log them to TensorBoard and as PNGs.

    Put it anywhere in ``trainer.callbacks``: it renders in ``teardown`` after every callback's ``on_fit_end``
    has written its artifacts (e.g. ``gmm_history.json``, ``compression_report.json``), so the figures see the
    final, compressed weights.

    Files written into the run folder (``trainer.log_dir``): ``figure_weights.npz`` (``initial``/``final``: a fixed
    sample of the compressed weights at fit start and end; ``layer_before``/``layer_after``/``layer_name``: the
    feature layer of figure 4) and ``figures/fig{N}_{name}.png``. TensorBoard tags: ``figures/{name}``.

    Args:
        figures: names of :data:`distill.report.FIGURES` to render (default: all the artifacts allow).
        save_png: also write PNG files.
        layer: dotted name of the parameter drawn in figure 4 (default: the first convolution weight, else the
            first dense weight over a square input, e.g. 784 = 28 x 28).
        max_points: at most this many weights are kept for figure 1 (a fixed random sample).
        dirname: sub-folder of the run folder for the PNGs.

    Example::

        trainer = Trainer(callbacks=[GMMPrior(...), PruneQuantize(...), FigureLogger()])
    """

    def __init__(
        self,
        figures: list[str] | None = None,
        save_png: bool = True,
        layer: str | None = None,
        max_points: int = 200_000,
        dirname: str = "figures",
    ) -> None:
        from distill.report import FIGURES

        if figures is not None:
            unknown = [f for f in figures if f not in FIGURES]
            if unknown:
                raise ValueError(f"figures: unknown figure names {unknown}, expected some of {list(FIGURES)}")
        if max_points < 1:
            raise ValueError(f"max_points must be a positive integer, got {max_points}")
        if not dirname or Path(dirname).is_absolute():
            raise ValueError(f"dirname must be a relative folder name, got {dirname!r}")
        self.figures = list(figures) if figures is not None else None
        self.save_png = save_png
        self.layer = layer
        self.max_points = max_points
        self.dirname = dirname
        self._initial: torch.Tensor | None = None
        self._layer_before: torch.Tensor | None = None
        self._layer_name: str | None = None
        self._fit_ended = False
        self._written: dict[str, Path] = {}

    # ---------------------------------------------------------------------------------------------------------------
    # extension points
    # ---------------------------------------------------------------------------------------------------------------
    def filter_parameters(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The weights drawn (figure 1) and searched for the feature layer: the default compressible parameters of
        the network :func:`distill.compress.params.network_of` picks (``.student``, else ``.model``, else the
        module). Override to choose others."""
        return default_compressible_parameters(network_of(pl_module)[0])

    def run_dir(self, trainer: pl.Trainer) -> Path:
        """The run folder: ``trainer.log_dir``, else ``trainer.default_root_dir``."""
        return run_folder(trainer)

    # ---------------------------------------------------------------------------------------------------------------
    def _sample(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in params.values()])
        idx = plots._subsample(flat.numel(), self.max_points)
        return flat if isinstance(idx, slice) else flat[torch.from_numpy(idx)]

    def _feature_layer(self, params: dict[str, torch.Tensor]) -> str | None:
        if self.layer is not None:
            if self.layer not in params:
                raise ValueError(f"layer={self.layer!r} is not a compressible parameter; choose one of {list(params)}")
            return self.layer
        try:
            return plots.pick_feature_layer(params)
        except ValueError:
            return None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_ended = False
        if self._initial is not None:  # restored from a checkpoint: keep the weights of the original start
            return
        params = self.filter_parameters(pl_module)
        if not params:
            return
        self._initial = self._sample(params)
        self._layer_name = self._feature_layer(params)
        if self._layer_name is not None:
            self._layer_before = params[self._layer_name].detach().float().cpu().clone()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_ended = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._fit_ended:
            return  # an interrupted fit, or validate/test: nothing new to draw
        self._fit_ended = False
        if not trainer.is_global_zero:
            return
        run_dir = self.run_dir(trainer)
        self.write_weights(run_dir, pl_module)
        self.render(run_dir, trainer.logger, trainer.global_step)

    def write_weights(self, run_dir: Path, pl_module: pl.LightningModule) -> None:
        """Write ``figure_weights.npz`` (weights at fit start and now) into ``run_dir``."""
        if self._initial is None:
            return
        params = self.filter_parameters(pl_module)
        arrays: dict[str, np.ndarray] = {}
        final = self._sample(params)
        if final.shape == self._initial.shape:
            arrays["initial"], arrays["final"] = self._initial.numpy(), final.numpy()
        name = self._layer_name
        if name is not None and name in params and self._layer_before is not None:
            after = params[name].detach().float().cpu()
            if after.shape == self._layer_before.shape:
                arrays["layer_before"], arrays["layer_after"] = self._layer_before.numpy(), after.numpy()
                arrays["layer_name"] = np.array(name)
        if arrays:
            atomic_savez(run_dir / "figure_weights.npz", **arrays)
            self._written["figure weights"] = run_dir / "figure_weights.npz"

    def render(self, run_dir: Path, logger: Any = None, step: int = 0) -> dict[str, Path]:
        """Draw the figures the run folder allows, log them to ``logger`` and write PNGs; returns the PNG paths."""
        from distill.report import figure_filename, load_run, run_figures

        run = load_run(run_dir, scalars=False) if run_dir.is_dir() else None
        if run is None:
            return {}
        pngs: dict[str, Path] = {}
        for name, fig in run_figures(run).items():
            if self.figures is not None and name not in self.figures:
                continue
            plots.log_figure(logger, f"figures/{name}", fig, step)
            if self.save_png:
                pngs[name] = plots.save_figure(fig, run_dir / self.dirname / figure_filename(name))
        if pngs:
            self._written["figures"] = run_dir / self.dirname
        return pngs

    def output_paths(self) -> dict[str, str]:
        """Files written by the last fit, for the CLI's summary."""
        return {label: str(path) for label, path in self._written.items()}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial": self._initial, "layer_before": self._layer_before, "layer_name": self._layer_name}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial = state_dict.get("initial")
        self._layer_before = state_dict.get("layer_before")
        self._layer_name = state_dict.get("layer_name")
