"""GMMPrior in a plain LightningModule: equivalence with one backward of loss + prior, resume, DDP, errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill import prior_kernels
from distill.callbacks import GMMPrior, LoadWeights
from distill.priors import GaussianMixturePrior

N_DATA = 64
BATCH = 16


class Plain(pl.LightningModule):
    """A module that knows nothing about the prior."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(batch: int = BATCH) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(N_DATA, 12, generator=g), torch.randint(0, 4, (N_DATA,), generator=g)),
                      batch_size=batch)


def prior_kwargs(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"num_components": 3, "tau": 50.0, "init_std": 0.2, "method": "exact",
                            "quantize_on_end": False, "save_weights": False, "lr_means": 1e-2}
    base.update(kw)
    return base


def reference(steps: int, accumulate: int = 1, clip: float | None = None, autocast: bool = False,
              batch: int = BATCH, before_step: Any = None, **kw: Any) -> tuple[nn.Module, GaussianMixturePrior]:
    """Plain torch: one backward of (mean task loss + tau/N * prior) per optimizer step."""
    model = Plain()
    cb = GMMPrior(**prior_kwargs(**kw))
    mix = cb.mixture
    weights = [model.net[0].weight, model.net[2].weight]
    with torch.no_grad():
        lo, hi = min(float(w.min()) for w in weights), max(float(w.max()) for w in weights)
        mix.free_means.copy_(torch.linspace(lo, hi, 3))
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    mopt = cb._build_optimizer()
    batches = list(loader(batch))
    scale = cb.current_tau(0) / N_DATA
    for s in range(steps):
        if before_step is not None:
            before_step(s, model)
        opt.zero_grad()
        mopt.zero_grad()
        for x, y in batches[s * accumulate:(s + 1) * accumulate]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model.net(x), y)
            (loss / accumulate).backward()
        mix.loss([w.double() for w in weights], scale=scale).backward()  # float64 naive-chunked reference
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        mopt.step()
        opt.step()
    return model, mix


def fit(trainer_kwargs: dict[str, Any], steps: int, callbacks: list[Callback] | None = None, batch: int = BATCH,
        **kw: Any) -> tuple[Plain, GMMPrior]:
    model = Plain()
    cb = GMMPrior(**prior_kwargs(**kw))
    trainer_kwargs = dict(trainer_kwargs, max_steps=steps, max_epochs=-1)
    pl.Trainer(callbacks=[cb, *(callbacks or [])], **trainer_kwargs).fit(model, loader(batch))
    return model, cb


def assert_same(model: nn.Module, mix: nn.Module, ref_model: nn.Module, ref_mix: nn.Module, tol: float = 1e-6) -> None:
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol, msg=name)
    for (name, a), b in zip(mix.named_parameters(), ref_mix.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(("method", "kernel"), [("exact", "auto"), ("table", "auto"), ("table", "torch")])
def test_equals_single_backward_of_loss_plus_prior(trainer_kwargs: dict[str, Any], method: str, kernel: str) -> None:
    model, cb = fit(trainer_kwargs, 4, method=method, kernel=kernel)
    ref_model, ref_mix = reference(4)
    assert_same(model, cb.mixture, ref_model, ref_mix, tol=1e-6 if method == "exact" else 1e-5)
    untouched = Plain()
    assert not torch.allclose(untouched.net[0].weight, model.net[0].weight)
    assert cb.last_prior_loss is not None and cb.dataset_size == N_DATA


def _move_out(step: int, model: nn.Module) -> None:
    """At step 2, two weights far beyond the range every weight had before."""
    if step == 2:
        with torch.no_grad():
            model.net[0].weight[0, 0] = 3.0
            model.net[2].weight[1, 1] = -2.5


def test_table_over_last_steps_range_is_exact_beyond_it(trainer_kwargs: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU table spans the previous step's weights (widened a little), measured by the pass itself: the weights'
    range is read on the first step only, and a weight that has moved beyond the table since gets its exact gradient.
    The run still equals one backward of loss + prior at every step."""
    calls = []
    measure = GMMPrior._weight_ranges
    monkeypatch.setattr(GMMPrior, "_weight_ranges", staticmethod(lambda *a, **k: calls.append(1) or measure(*a, **k)))

    class MoveOut(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _move_out(trainer.global_step, pl_module)

    model, cb = fit(trainer_kwargs, 4, callbacks=[MoveOut()], method="table")
    ref_model, ref_mix = reference(4, before_step=_move_out)
    assert_same(model, cb.mixture, ref_model, ref_mix, tol=1e-5)
    assert len(calls) == 1  # the first step's
    # the last pass saw the two moved weights (pulled in since, far beyond the others, which start within +-0.3)
    assert cb._range_hint is not None and cb._range_hint[0] < -1.5 and cb._range_hint[1] > 1.5
    assert cb.state_dict()["range_hint"] == list(cb._range_hint)


def _wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 120), nn.ReLU(), nn.Linear(120, 10))  # 37,200 weights: on torch's team if any


def _prior_on(net: nn.Module, **kw: Any) -> tuple[nn.Module, GMMPrior]:
    """A copy of ``net`` and a GMMPrior set up on it as ``on_fit_start`` would, outside a Trainer."""
    model = copy.deepcopy(net)
    cb = GMMPrior(**prior_kwargs(**{"num_components": 8, "init_std": 0.05, "gamma": (25.0, 0.01), **kw}))
    cb._params = cb.filter_parameters(model)
    cb.num_weights = sum(p.numel() for p in cb._params.values())
    with torch.no_grad():
        cb.mixture.free_means.copy_(torch.linspace(-0.05, 0.05, 8))
    cb.optimizer = cb._build_optimizer()
    return model, cb


def _host_step_statuses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What each ``HostStep.run`` call returns, from now on."""
    statuses: list[int] = []
    run = prior_kernels.HostStep.run
    monkeypatch.setattr(prior_kernels.HostStep, "run", lambda self, *a: statuses.append(run(self, *a)) or statuses[-1])
    return statuses


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
def test_auto_goes_exact_when_a_component_is_too_narrow_for_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """``method="auto"``: once a component narrows so far that the table would need more than its 65,536 points, the
    one-call step gives up before touching a gradient and the step runs exact, as ``method="exact"`` does."""
    net = _wide_net()
    statuses = _host_step_statuses(monkeypatch)
    model, cb = _prior_on(net, method="auto")
    for step in range(3):
        if step == 2:
            with torch.no_grad():
                cb.mixture.log_precisions[3] = 2 * math.log(1e6)  # std 1e-6: ~10^6 grid points at the spacing
            mixture = copy.deepcopy(cb.mixture.state_dict())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        cb.apply_prior_gradient(scale=1e-3, step=step)
        if step < 2:
            cb.step_mixture()
    assert statuses == [prior_kernels.STEP_DONE, prior_kernels.STEP_GRID_TOO_FINE]
    ref_model, ref = _prior_on(net, method="exact")
    ref.mixture.load_state_dict(mixture)
    for p in ref_model.parameters():
        p.grad = torch.zeros_like(p)
    ref.apply_prior_gradient(scale=1e-3, step=2)
    for a, b in zip([*model.parameters(), *cb.mixture.parameters()],
                    [*ref_model.parameters(), *ref.mixture.parameters()], strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize(("grad_scale", "pi_zero_beta"), [(1.0, None), (1024.0, (50.0, 2.0))])
def test_one_call_cpu_step_equals_the_general_path(monkeypatch: pytest.MonkeyPatch, grad_scale: float,
                                                   pi_zero_beta: tuple[float, float] | None) -> None:
    """The CPU prior's step in one compiled call (``prior_kernels.HostStep``, from the second step on, once the
    mixture has gradients to write into) sets the same weight and mixture gradients as the general fused path, bit
    for bit, and the same loss, also for a weight moved beyond the table between steps; with AMP's loss scale on the
    weights' gradients and a learned zero component (Beta hyper-prior) too."""
    net = _wide_net()
    statuses = _host_step_statuses(monkeypatch)
    runs = []
    for one_call in (True, False):
        model, cb = _prior_on(net, method="auto", pi_zero_beta=pi_zero_beta)
        if not one_call:
            monkeypatch.setattr(cb, "_host_step", lambda *args: None)
        record = []
        for step in range(5):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.01)  # fresh tensors, as after zero_grad(set_to_none=True)
            if step == 3:
                with torch.no_grad():
                    model[0].weight[0, 0] = 2.0
            loss = cb.apply_prior_gradient(scale=1e-3, step=step, grad_scale=grad_scale)
            record.append((loss, [p.grad.clone() for p in model.parameters()],
                           [q.grad.clone() for q in cb.mixture.parameters()]))  # type: ignore[union-attr]
            cb.step_mixture()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 / grad_scale * p.grad  # type: ignore[operator]
        assert ("_plan" in cb.__dict__) == one_call
        assert (cb.mixture.zero_logit is not None) == (pi_zero_beta is not None)
        runs.append(record)
    assert statuses == [prior_kernels.STEP_DONE] * 4  # steps 1-4 of the first run, in one call each
    for (loss_a, grads_a, mix_a), (loss_b, grads_b, mix_b) in zip(*runs, strict=True):
        assert loss_a == loss_b
        for a, b in zip(grads_a + mix_a, grads_b + mix_b, strict=True):
            assert torch.equal(a, b)


def test_with_gradient_accumulation(trainer_kwargs: dict[str, Any]) -> None:
    model, cb = fit(dict(trainer_kwargs, accumulate_grad_batches=2), 2)
    assert_same(model, cb.mixture, *reference(2, accumulate=2))


def test_with_gradient_clipping(trainer_kwargs: dict[str, Any]) -> None:
    model, cb = fit(dict(trainer_kwargs, gradient_clip_val=0.05), 3, tau=5000.0)
    ref = reference(3, clip=0.05, tau=5000.0)
    assert_same(model, cb.mixture, *ref)
    unclipped = reference(3, tau=5000.0)[0]
    assert not torch.allclose(unclipped.net[0].weight, model.net[0].weight, atol=1e-4)  # clipping did act


def test_with_bf16_mixed_precision(trainer_kwargs: dict[str, Any]) -> None:
    model, cb = fit(dict(trainer_kwargs, precision="bf16-mixed"), 3)
    assert_same(model, cb.mixture, *reference(3, autocast=True), tol=1e-5)


class PlainFusedAdam(Plain):
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2, fused=True)


@pytest.mark.parametrize("overflow", [False, True])
def test_with_a_gradient_scaler_and_an_optimizer_that_unscales_itself(trainer_kwargs: dict[str, Any],
                                                                      overflow: bool) -> None:
    """16-bit AMP with a fused optimizer (it unscales inside its step, so Lightning leaves the gradients scaled when
    the callback adds the prior's): equal to plain torch with one backward of the scaled loss + scaled prior. On a CPU
    through an explicit plugin (Lightning maps precision="16-mixed" to bf16 there); tests/test_cuda.py has the GPU.
    ``overflow``: the loss scale starts at 2^127 so that the first steps overflow and are skipped, mixture included."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    init = 2.0**127 if overflow else 2.0**16
    steps = 3
    torch.manual_seed(0)
    model, cb = PlainFusedAdam(), GMMPrior(**prior_kwargs())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init))
    pl.Trainer(callbacks=[cb], plugins=[plugin], **dict(trainer_kwargs, max_steps=steps, max_epochs=-1)
               ).fit(model, loader())

    ref = PlainFusedAdam()
    ref_cb = GMMPrior(**prior_kwargs())
    mix = ref_cb.mixture
    weights = [ref.net[0].weight, ref.net[2].weight]
    with torch.no_grad():
        lo, hi = min(float(w.min()) for w in weights), max(float(w.max()) for w in weights)
        mix.free_means.copy_(torch.linspace(lo, hi, 3))
    opt = ref.configure_optimizers()
    mopt = ref_cb._build_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    scale = ref_cb.current_tau(0) / N_DATA
    skipped = 0
    for x, y in list(loader())[:steps]:
        opt.zero_grad()
        mopt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref.net(x), y)
        scaler.scale(loss).backward()
        prior = mix.loss([w.double() for w in weights], scale=scale)
        for w, g in zip(weights, torch.autograd.grad(prior, weights, retain_graph=True), strict=True):
            w.grad.add_(g, alpha=scaler.get_scale())  # type: ignore[union-attr]  # the scaled loss + scaled prior
        prior.backward(inputs=list(mix.parameters()))  # the mixture's own gradients are not scaled
        before = [w.detach().clone() for w in weights]
        scaler.step(opt)
        if all(torch.equal(a, w) for a, w in zip(before, weights, strict=True)):
            skipped += 1  # the fused step found inf/NaN: the mixture skips its step too
        else:
            mopt.step()
        scaler.update()
    assert (skipped > 0) == overflow
    assert_same(model, cb.mixture, ref, mix, tol=1e-5)


def test_with_16_mixed_precision(trainer_kwargs: dict[str, Any]) -> None:
    with pytest.warns(UserWarning, match="not supported on CPU"):
        pl.Trainer(**dict(trainer_kwargs, precision="16-mixed"))
    pytest.skip("Lightning 2.6 turns precision='16-mixed' on CPU into 'bf16-mixed' (covered above); "
                "fp16 AMP with a GradScaler needs a GPU")


class PlainSharded(Plain):
    """Each rank reads every other sample, in order: rank r of 2 sees samples r, r+2, ..."""

    def setup(self, stage: str) -> None:
        # ddp_spawn pickles the module through shared memory: give each rank its own storage so that each rank's
        # optimizer updates only its own copy (otherwise both ranks step the same tensors)
        for p in self.parameters():
            p.data = p.data.clone()

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data.distributed import DistributedSampler

        data = loader().dataset
        sampler = DistributedSampler(data, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH // 2, sampler=sampler)


class SaveRankState(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gmm = next(c for c in trainer.callbacks if isinstance(c, GMMPrior))
        state = {f"net.{k}": v.detach().clone() for k, v in pl_module.state_dict().items()}
        state.update({f"mix.{k}": v.detach().clone() for k, v in gmm.mixture.state_dict().items()})
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_ddp_two_cpu_processes(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    kwargs = dict(trainer_kwargs, devices=2, strategy="ddp_spawn", use_distributed_sampler=False, max_steps=3,
                  max_epochs=-1)
    cb = GMMPrior(**prior_kwargs(dataset_size=N_DATA))
    pl.Trainer(callbacks=[cb, SaveRankState(str(tmp_path))], **kwargs).fit(PlainSharded())
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # 2 ranks x BATCH/2 interleaved samples == one process with the global batch of BATCH
    ref_model, ref_mix = reference(3)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(r0[f"net.{k}"], v, rtol=1e-5, atol=1e-5)
    for k, v in ref_mix.state_dict().items():
        torch.testing.assert_close(r0[f"mix.{k}"], v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prune_from", [None, 1, 3])  # no pruning; pruned before the interruption; after it
def test_resume_from_last_ckpt_ends_like_uninterrupted(trainer_kwargs: dict[str, Any], tmp_path: Path,
                                                       prune_from: int | None) -> None:
    common = dict(trainer_kwargs, enable_checkpointing=True, max_steps=-1, logger=False)

    def run(epochs: int, folder: Path, ckpt: str | None = None) -> tuple[Plain, GMMPrior]:
        model = Plain()
        cb = GMMPrior(**prior_kwargs(method="table", lr_means=1e-2, prune_from_epoch=prune_from))
        mc = ModelCheckpoint(dirpath=folder, save_last=True)
        trainer = pl.Trainer(callbacks=[cb, mc], **dict(common, max_epochs=epochs, default_root_dir=str(folder)))
        torch.manual_seed(3)
        trainer.fit(model, loader(), ckpt_path=ckpt)
        return model, cb

    full_model, full_cb = run(4, tmp_path / "full")
    run(2, tmp_path / "part")
    model, cb = run(4, tmp_path / "part", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert_same(model, cb.mixture, full_model, full_cb.mixture, tol=1e-7)
    assert cb.history["steps"] == full_cb.history["steps"]
    assert cb.optimizer is not None and full_cb.optimizer is not None
    s1, s2 = cb.optimizer.state_dict()["state"], full_cb.optimizer.state_dict()["state"]
    assert float(s1[0]["step"]) == float(s2[0]["step"]) == 16
    assert cb.pruned == full_cb.pruned and (cb.pruned is None) == (prune_from is None)
    if prune_from is not None:
        assert cb.pruned is not None and cb.pruned["epoch"] == prune_from
        for name, mask in full_cb.masks.items():
            torch.testing.assert_close(cb.masks[name], mask, rtol=0, atol=0)


def test_a_resumed_run_keeps_the_epochs_prior_loss_and_the_initial_weights(trainer_kwargs: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    """Logging across a resume: the epoch's mean prior loss goes on from the sum at the stop (not from the resume's
    first step), and gmm_weights.npz's "initial" are the first run's, read from the file it wrote at its start."""

    def run(folder: Path, ckpt: str | None = None) -> tuple[float, Path]:
        cb = GMMPrior(**prior_kwargs(method="table", save_weights=True))
        tb = TensorBoardLogger(str(folder), name="run")
        mid = ModelCheckpoint(dirpath=folder, filename="mid", every_n_train_steps=6, save_top_k=-1)  # 4 steps/epoch
        kwargs = dict(trainer_kwargs, max_epochs=2, max_steps=-1, logger=tb, default_root_dir=str(folder),
                      enable_checkpointing=True)
        trainer = pl.Trainer(callbacks=[cb, mid], **kwargs)
        torch.manual_seed(3)
        x, y = next(iter(loader()))  # four equal batches: a plain loader restarts its epoch on a mid-epoch resume
        trainer.fit(Plain(), DataLoader(TensorDataset(x.repeat(4, 1), y.repeat(4)), batch_size=BATCH), ckpt_path=ckpt)
        return float(trainer.callback_metrics["gmm/prior_loss_epoch"]), Path(tb.log_dir)

    full_loss, full_dir = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "mid.ckpt"  # written at step 6, half-way through epoch 1
    resumed_loss, resumed_dir = run(tmp_path / "b", ckpt=str(ckpt))
    assert resumed_loss == pytest.approx(full_loss, rel=1e-9)  # epoch 1's mean over its 4 steps, not the last 2
    with np.load(full_dir / "gmm_weights.npz") as a, np.load(resumed_dir / "gmm_weights.npz") as b:
        np.testing.assert_array_equal(a["initial"], b["initial"])
        np.testing.assert_allclose(a["final"], b["final"], rtol=1e-6, atol=1e-7)
    moved = full_dir / "moved.npz"
    (full_dir / "gmm_weights.npz").rename(moved)  # the first run's file gone: the resume says so and goes on
    with pytest.warns(UserWarning, match="initial weights of the run this one resumes cannot be read"):
        _, again_dir = run(tmp_path / "c", ckpt=str(ckpt))
    with np.load(again_dir / "gmm_weights.npz") as z, np.load(moved) as a:
        assert not np.array_equal(z["initial"], a["initial"])  # the weights at the resume
        assert str(z["initial_id"]) != str(a["initial_id"])
        other = {k: a[k] for k in a.files} | {"initial_id": np.asarray("another run")}
    np.savez(full_dir / "gmm_weights.npz", **other)  # another run's file of that name, same shapes: not taken
    with pytest.warns(UserWarning, match="initial weights of the run this one resumes cannot be read"):
        run(tmp_path / "d", ckpt=str(ckpt))


class PlainAdam(Plain):
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_prune_from_epoch_holds_the_zero_components_members_at_zero(trainer_kwargs: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    model = PlainAdam()
    cb = GMMPrior(**prior_kwargs(prune_from_epoch=1, tau=5.0, method="table", pi_zero=0.9, init_std=0.05))
    seen: dict[str, Any] = {}

    class Snapshot(Callback):  # after GMMPrior's epoch start: the weights just after the prune
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 1:
                seen["w"] = {n: p.detach().clone() for n, p in cb._params.items()}

    class Expected(Callback):  # before GMMPrior's epoch start: which weights the zero component owns
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 1:
                m, s, pi = cb._merged_mixture()
                seen["zero"] = {n: cb_quantized_zero(p, m, s, pi) for n, p in cb._params.items()}

    logger = TensorBoardLogger(str(tmp_path), name="run")
    pl.Trainer(callbacks=[Expected(), cb, Snapshot()],
               **dict(trainer_kwargs, max_epochs=4, max_steps=-1, logger=logger)).fit(model, loader())
    assert cb.pruned is not None and cb.pruned["epoch"] == 1 and cb.pruned["step"] == N_DATA // BATCH
    zeros = 0
    for name, p in cb._params.items():
        zero = seen["zero"][name]
        assert torch.equal(cb.masks[name] == 0, zero), name  # the mask is what quantize() would zero
        assert bool((seen["w"][name][zero] == 0).all())  # set to 0 at the start of the epoch
        assert bool((p.detach()[zero] == 0).all()), name  # and still 0 after 3 epochs of Adam
        assert bool((p.detach()[~zero] != 0).all()), name  # the others train on
        zeros += int(zero.sum())
    total = sum(p.numel() for p in cb._params.values())
    assert 0 < zeros < total  # a real split: some pruned, some kept
    assert cb.pruned["nonzero"] == pytest.approx(1 - zeros / total)
    hist = json.loads((Path(logger.log_dir) / "gmm_history.json").read_text())
    assert hist["pruned"]["epoch"] == 1 and set(hist["pruned"]["nonzero_by_layer"]) == set(cb._params)


def cb_quantized_zero(p: torch.Tensor, m: torch.Tensor, s: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    from distill.priors import quantize_weights

    _, idx = quantize_weights(p.detach(), m, s, pi)
    return (idx == 0).view(p.shape)


def test_artifacts_logging_and_quantize(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="run")
    model, cb = fit(dict(trainer_kwargs, logger=logger, max_epochs=2, log_every_n_steps=1), 8,
                    quantize_on_end=True, save_weights=True, method="auto", num_components=4, tau=500.0)
    run = Path(logger.log_dir)
    hist = json.loads((run / "gmm_history.json").read_text())
    assert hist["epochs"] == [0, 0, 1] and hist["steps"] == [0, 4, 8]
    assert len(hist["means"][0]) == 5 and hist["means"][0][0] == 0.0
    assert hist["merged"] is not None and abs(sum(hist["merged"]["pis"]) - 1.0) < 1e-6
    assert hist["hyperprior"]["gamma_zero"] == [5000.0, 2.0]
    with np.load(run / "gmm_weights.npz", allow_pickle=False) as z:
        assert set(z.files) == {"initial", "final", "quantized", "initial_id"}
        assert z["initial"].dtype == np.float32 and z["initial"].shape == (12 * 16 + 16 * 4,)
        assert not np.array_equal(z["initial"], z["final"])
        assert len(np.unique(z["quantized"])) <= 5
        q = z["quantized"]
    # the non-zero fraction logged at the last epoch end is what quantizing left non-zero, overall and per layer
    assert len(hist["nonzero"]) == 3 and hist["nonzero"][-1] == pytest.approx(np.count_nonzero(q) / q.size)
    assert hist["nonzero_by_layer"][-1]["net.0.weight"] == pytest.approx(np.count_nonzero(q[:12 * 16]) / (12 * 16))
    w = torch.cat([model.net[0].weight.reshape(-1), model.net[2].weight.reshape(-1)])
    np.testing.assert_array_equal(w.detach().numpy(), np.load(run / "gmm_weights.npz")["quantized"])
    codebook = cb.quantize(model)["*"]
    assert codebook[0] == 0 and set(torch.unique(w).tolist()) <= set(codebook.tolist())
    w2 = torch.cat([model.net[0].weight.reshape(-1), model.net[2].weight.reshape(-1)])
    assert torch.equal(w, w2)  # idempotent
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"gmm/mean_1", "gmm/std_0", "gmm/pi_0", "gmm/significant", "gmm/nonzero"} <= tags
    assert {"gmm/prior_loss_step", "gmm/prior_loss_epoch"} <= tags
    assert "gmm/weights/net.0.weight" in ea.Tags()["histograms"]
    assert len(torch.unique(model.net[0].bias)) > 5  # biases stay full precision


def test_load_weights_then_prior(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    src = Plain()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    model = Plain()
    cb = GMMPrior(**prior_kwargs(tau=0.0))
    pl.Trainer(callbacks=[LoadWeights(str(ckpt)), cb], **dict(trainer_kwargs, max_steps=1)).fit(model, loader())
    lo = min(float(p.min()) for p in (src.net[0].weight, src.net[2].weight))
    assert float(cb.history["means"][0][1]) == pytest.approx(lo, abs=1e-6)  # means spread over the loaded weights
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"net.0.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(KeyError, match="missing keys"):
        pl.Trainer(callbacks=[LoadWeights(str(bad))], **trainer_kwargs).fit(Plain(), loader())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pl.Trainer(callbacks=[LoadWeights(str(tmp_path / "nope.ckpt"))], **trainer_kwargs).fit(Plain(), loader())


@pytest.mark.parametrize("method", ["exact", "table"])  # table: found in the loss, then named
def test_nan_weight_raises_with_name_and_step(trainer_kwargs: dict[str, Any], method: str) -> None:
    class Nan(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net[2].weight[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match=r"net\.2\.weight.*step 2"):
        fit(trainer_kwargs, 4, callbacks=[Nan()], method=method)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_components": 0}, "num_components"),
        ({"tau": -1.0}, "tau"),
        ({"method": "fast"}, "method"),
        ({"kernel": "cuda"}, "kernel"),
        ({"pi_zero": 1.5}, "pi_zero"),
        ({"gamma": (1.0,)}, "gamma"),
        ({"lr_means": -1}, "lr_means"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"merge_criterion": "l2"}, "merge_criterion"),
        ({"prune_from_epoch": -1}, "prune_from_epoch"),
        ({"prune_from_epoch": 2.5}, "prune_from_epoch"),
    ],
)
def test_misconfiguration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GMMPrior(**kwargs)


def test_empty_parameter_set_is_an_error(trainer_kwargs: dict[str, Any]) -> None:
    class NoWeights(GMMPrior):
        def filter_parameters(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
            return {}

    with pytest.raises(ValueError, match="no parameter to compress"):
        pl.Trainer(callbacks=[NoWeights()], **trainer_kwargs).fit(Plain(), loader())


def test_warmup_and_callable_tau() -> None:
    cb = GMMPrior(tau=0.1, warmup_epochs=3)
    assert [cb.current_tau(e) for e in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    assert GMMPrior(tau=lambda e: 0.5 * e).current_tau(4) == 2.0
    assert copy.deepcopy(cb).current_tau(0) == pytest.approx(0.025)


def test_tau_schedule_is_piecewise_constant_from_its_first_epochs() -> None:
    cb = GMMPrior(tau={"20": 0.1, 0: 1.0, 25: 0.0}, warmup_epochs=1)  # keys from YAML may come as strings
    assert cb.tau == {0: 1.0, 20: 0.1, 25: 0.0}
    taus = [cb.current_tau(e) for e in (0, 1, 19, 20, 24, 25, 40)]
    assert taus == pytest.approx([0.5, 1.0, 1.0, 0.1, 0.1, 0.0, 0.0])
    assert cb._history_json()["hyperprior"]["tau"] == {"0": 1.0, "20": 0.1, "25": 0.0}
    for bad, match in (({5: 1.0}, "from epoch 0 on"), ({0: 1.0, 2.5: 0.1}, "2.5"), ({0: -1.0}, "tau schedule"),
                       ({0: 1.0, "x": 0.1}, "'x'")):
        with pytest.raises(ValueError, match=match):
            GMMPrior(tau=bad)


@pytest.mark.parametrize(
    ("name", "tau", "warmup", "gamma", "distilled"),
    [("lenet300_100_sws", 0.03, 5, (25.0, 0.01), False),
     ("lenet5_caffe_sws", {0: 1.0, 20: 0.1}, 5, (250.0, 0.1), True)],
)
def test_sws_configs_parse(name: str, tau: Any, warmup: int, gamma: tuple[float, float], distilled: bool) -> None:
    from distill.cli import DistillCLI

    config = Path(__file__).resolve().parents[1] / "configs" / "mnist" / f"{name}.yaml"
    if distilled:  # a Distiller loads its teacher checkpoint when built: parse and type-check only (the config is
        # built and trained for two steps against a teacher by test_cli_configs.test_config_fits_two_steps)
        from tests.conftest import ParseOnlyCLI

        cfg = ParseOnlyCLI(args=["-c", str(config)], run=False).config
        model = cfg["model"]
        assert model["class_path"] == "distill.modules.Distiller" and model["init_args"]["init_from_teacher"]
        assert model["init_args"]["loss"] == "kd" and str(model["init_args"]["teacher"]).endswith("last.ckpt")
        callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]
        assert "LoadWeights" not in callbacks and callbacks.index("GMMPrior") < callbacks.index("PruneQuantize")
        args = cfg["trainer"]["callbacks"][callbacks.index("GMMPrior")]["init_args"]
        assert args["num_components"] == 16 and args["warmup_epochs"] == warmup
        assert GMMPrior(tau=args["tau"]).tau == tau and tuple(args["gamma"]) == gamma
        assert args["prune_from_epoch"] == 30 and cfg["trainer"]["max_epochs"] == 40  # zeros held for the last 10
        return
    cli = DistillCLI(args=["-c", str(config), "--data.init_args.download", "false"], run=False)
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert kinds.index("LoadWeights") < kinds.index("GMMPrior")
    gmm = next(c for c in cli.trainer.callbacks if isinstance(c, GMMPrior))
    assert gmm.num_components == 16 and gmm.tau == tau and gmm.warmup_epochs == warmup
    assert gmm.mixture.gamma == gamma
    pq = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PruneQuantize")
    assert kinds.index("GMMPrior") < kinds.index("PruneQuantize") and pq.finetune_epochs == 2


def test_kmeans_initial_means_sit_where_the_weights_are() -> None:
    torch.manual_seed(0)
    w = [torch.cat([torch.randn(5000) * 0.01, torch.randn(500) * 0.02 + 0.3, torch.randn(500) * 0.02 - 0.3])]
    cb = GMMPrior(num_components=4, init_means="kmeans")
    means = cb._initial_means(w)
    assert means.shape == (4,) and torch.all(means[1:] > means[:-1])
    assert (means.abs() > 0.02).all()  # the cluster at zero belongs to the zero component
    assert ((means - 0.3).abs() < 0.05).any() and ((means + 0.3).abs() < 0.05).any()
    spread = GMMPrior(num_components=4)._initial_means(w)  # "range": evenly over [min, max]
    torch.testing.assert_close(spread, torch.linspace(float(w[0].min()), float(w[0].max()), 4))
    with pytest.raises(ValueError, match="init_means must be 'range' or 'kmeans'"):
        GMMPrior(init_means="quantiles")


def test_mixture_adam_steps_like_torch_adam_and_shares_its_state_dict() -> None:
    """The mixture's optimizer runs Adam in NumPy on a CPU: same updates and state as torch's Adam."""
    from distill.callbacks.gmm_prior import _MixtureAdam

    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in ((17,), (16,), ())]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"params": ps[:1], "lr": 3e-3}, {"params": ps[1:], "lr": 1e-4, "betas": (0.8, 0.99)}]

    opt, ref = _MixtureAdam(groups(params)), torch.optim.Adam(groups(ref_params), foreach=False)
    assert opt._host_ok()
    for step in range(30):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(params, ref_params, strict=True):
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (step % 3 - 2)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    state = opt.state_dict()
    for key in ("step", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state["state"][1][key], ref.state_dict()["state"][1][key], rtol=1e-6, atol=1e-9)
    restored = torch.optim.Adam(groups([p.detach().clone().requires_grad_(True) for p in params]))
    restored.load_state_dict(state)  # checkpoints interchange with torch's Adam
    assert not _MixtureAdam(groups(params), amsgrad=True)._host_ok()  # falls back to torch's step


def test_mixture_adam_fast_step_follows_replaced_gradients_and_state() -> None:
    """``fast_step`` keeps NumPy views between steps; a new gradient tensor or a loaded state must not be missed."""
    from distill.callbacks.gmm_prior import _MixtureAdam

    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in ((17,), (16,))]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    opt = _MixtureAdam([{"params": params[:1], "lr": 3e-3}, {"params": params[1:], "lr": 1e-3}])
    ref = torch.optim.Adam([{"params": ref_params[:1], "lr": 3e-3}, {"params": ref_params[1:], "lr": 1e-3}],
                           foreach=False)
    for step in range(12):
        g = torch.Generator().manual_seed(step)
        for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
            new = torch.randn(p.shape, generator=g)
            if step in (0, 5) or i == 1 and step == 7:
                p.grad = new.clone()  # a fresh tensor: the cached view would write to the old one
            else:
                p.grad.copy_(new)  # type: ignore[union-attr]
            q.grad = new.clone()
        if step == 9:  # a resumed run: the state tensors are replaced
            opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # a copy: loading shares the tensors
        if step == 10:
            opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 5e-4  # a schedule
        opt.fast_step()
        ref.step()
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}")


def test_weight_views_follow_in_place_updates_and_replaced_tensors() -> None:
    """The callback keeps NumPy views of the weights between steps: in-place updates show through them, and a weight
    given new memory or a new layout (``.data = ...``) is not read through the old view."""
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    cb = GMMPrior(**prior_kwargs())
    params = [model[0].weight, model[2].weight]
    first = cb._host_arrays(params)  # type: ignore[arg-type]
    assert first is not None and cb._host_arrays(params) is first  # type: ignore[arg-type]
    with torch.no_grad():
        params[0].add_(1.0)
    assert np.array_equal(first[0], params[0].detach().numpy().reshape(-1))
    params[0].data = params[0].data.clone()  # new memory
    second = cb._host_arrays(params)  # type: ignore[arg-type]
    assert second is not first and np.shares_memory(second[0], params[0].detach().numpy())  # type: ignore[index]
    params[1].data = params[1].data.t()  # same memory, not contiguous: no host view at all
    assert cb._host_arrays(params) is None  # type: ignore[arg-type]
    params[1].data = params[1].data.double().t().contiguous()  # float64: the ATen path
    assert cb._host_arrays(params) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["before the network's step", "after the network's step"])
def test_ctrl_c_between_the_two_steps_resumes_like_uninterrupted(trainer_kwargs: dict[str, Any], tmp_path: Path,
                                                                 where: str) -> None:
    """The mixture steps after the network's optimizer: a Ctrl-C before the network's step leaves both unstepped, one
    after it has the mixture's step finished before the interrupt checkpoint is written; either way last.ckpt holds
    both steps of a batch or neither, and the resumed run steps the mixture once per network step (before, the mixture
    could be a step ahead and stepped twice for that batch). (Bit-identical mid-epoch resumes need a resumable loader,
    as distill's data modules have: tests/test_data.py.)"""
    from distill.callbacks import ModelCheckpoint as DistillCheckpoint

    common = dict(trainer_kwargs, enable_checkpointing=True, max_steps=-1, logger=False, max_epochs=3)
    stop_at = 6  # a step of epoch 1 (4 batches an epoch)

    class Interrupt(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
            if where.startswith("before") and trainer.global_step == stop_at:
                raise KeyboardInterrupt

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if where.startswith("after") and trainer.global_step == stop_at + 1:
                raise KeyboardInterrupt  # the network has stepped; GMMPrior's batch end has not run yet

    def run(folder: Path, extra: list[Callback], ckpt: str | None = None) -> tuple[Plain, GMMPrior]:
        model = Plain()
        cb = GMMPrior(**prior_kwargs(method="table", lr_means=1e-2))
        mc = DistillCheckpoint(dirpath=folder, filename="last", save_on_interrupt=True)
        callbacks = [*extra, cb, mc] if where.startswith("after") else [cb, *extra, mc]
        trainer = pl.Trainer(callbacks=callbacks, **dict(common, default_root_dir=str(folder)))
        torch.manual_seed(3)
        trainer.fit(model, loader(), ckpt_path=ckpt)
        return model, cb

    _, full_cb = run(tmp_path / "full", [])
    with pytest.raises(SystemExit):  # Lightning exits after a KeyboardInterrupt
        run(tmp_path / "part", [Interrupt()])
    saved = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    gmm_state = next(v for k, v in saved["callbacks"].items() if k.startswith("GMMPrior"))
    mixture_steps = float(gmm_state["optimizer"]["state"][0]["step"])
    assert mixture_steps == saved["global_step"] == (stop_at if where.startswith("before") else stop_at + 1)
    model, cb = run(tmp_path / "part", [], ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert cb.optimizer is not None and full_cb.optimizer is not None
    steps = [float(c.optimizer.state_dict()["state"][0]["step"]) for c in (cb, full_cb)]
    assert steps == [12.0, 12.0]  # 3 epochs of 4 batches, one mixture step each
