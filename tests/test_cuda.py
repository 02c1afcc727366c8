"""The CUDA paths the CPU suite cannot reach, each test run on ``"cpu"`` and ``"cuda"``.

Every test is parametrized over the device; the CUDA case is skipped where ``torch.cuda.is_available()`` is False, so
the CPU case proves the test's logic on any machine and the CUDA case runs unchanged on a GPU machine. Cases that only
exist on CUDA (fp16 ``"16-mixed"`` with a GradScaler: Lightning turns it into bf16 on a CPU) are CUDA-only.

* GMMPrior on the device equals one backward of ``loss + tau/N * prior`` in plain torch on the same device
  (fp32, bf16 autocast, fp16 autocast with a GradScaler; exact and table methods, both kernels);
* the prior's weight gradient on the device, through the callback's own code, within 1e-4 of the float64 exact one;
* Distiller end to end and layer-wise: teacher on the student's device, frozen, not checkpointed, hooks gone, and
  the same student weights as the same run on a CPU;
* the compressed file written from a model trained and quantized on the device loads onto the device and the CPU
  with the in-memory quantized weights and outputs;
* MagnitudePruning's zeros hold on the device through SGD momentum / AdamW steps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from distill.callbacks import GMMPrior, MagnitudePruning, PruneQuantize
from distill.compress import load_compressed
from distill.data import DigitsDataModule
from distill.hooks import has_hooks
from distill.modules import Distiller
from distill.priors import mixture_nll_grad
from models.lenet import MLP
from tests.conftest import random_loader
from tests.test_callbacks_prune_quantize import PlainDigits
from tests.test_callbacks_pruning import Plain as PlainPruning
from tests.test_callbacks_pruning import ZeroWatcher
from tests.test_gmm_prior import N_DATA, Plain, loader, prior_kwargs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.gpu])]


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """Full float32 matrix products on the GPU (TF32 would make CUDA-vs-CPU comparisons meaningless)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def on(trainer_kwargs: dict[str, Any], device: str, **kw: Any) -> dict[str, Any]:
    """The conftest trainer settings on ``device`` (Lightning's accelerator names it ``gpu``)."""
    return dict(trainer_kwargs, accelerator="gpu" if device == "cuda" else "cpu", devices=1, **kw)


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the fused CUDA prior kernel (distill.prior_cuda.accumulate) from here on, in a list."""
    from distill import prior_cuda

    calls: list[int] = []
    real = prior_cuda.accumulate

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(prior_cuda, "accumulate", counted)
    return calls


def uses_kernel(device: str, method: str, kernel: str) -> bool:
    """Whether GMMPrior runs its fused Triton kernel: on CUDA, kernel "auto", method "auto" or "exact"."""
    return device == "cuda" and kernel == "auto" and method != "table"


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# 1. GMMPrior == one backward of (loss + tau/N * prior), on the device, in every precision
# ----------------------------------------------------------------------------------------------------------------------

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
STEPS = 3


def layer_weights(model: Plain) -> list[torch.Tensor]:
    """The weights of the two Linear layers of test_gmm_prior's ``Plain`` (what GMMPrior compresses)."""
    return [cast(nn.Linear, model.net[i]).weight for i in (0, 2)]


def reference_on(device: str, precision: str, steps: int = STEPS, **kw: Any
                 ) -> tuple[Plain, nn.Module, float | None]:
    """Plain torch on ``device``, as Lightning's precision plugins run a step: autocast forward, (scaled) backward,
    [GradScaler.unscale_], the float64 prior's gradient added (GMMPrior adds its gradient in on_before_optimizer_step,
    after unscaling, before clipping), then the network's step and the mixture's (the mixture's Adam steps after the
    network's optimizer; neither reads what the other changes, so the order is immaterial, but it is kept).
    Returns the model, the mixture and the GradScaler's final scale (``None`` without one)."""
    model = Plain().to(device)
    cb = GMMPrior(**prior_kwargs(**kw))
    mix = cb.mixture.to(device=device, dtype=torch.float32)  # as GMMPrior.on_fit_start
    weights = layer_weights(model)
    with torch.no_grad():
        lo, hi = min(float(w.min()) for w in weights), max(float(w.max()) for w in weights)
        mix.free_means.copy_(torch.linspace(lo, hi, 3))
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    mopt = cb._build_optimizer()  # the callback's own (fused Adam on CUDA)
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None  # Lightning's MixedPrecision default
    batches = list(loader())
    scale = cb.current_tau(0) / N_DATA
    for s in range(steps):
        opt.zero_grad()
        mopt.zero_grad()
        x, y = (t.to(device) for t in batches[s])
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model.net(x), y)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        mix.loss([w.double() for w in weights], scale=scale).backward()  # float64 naive-chunked reference
        if scaler is None:
            opt.step()
            mopt.step()
        else:
            found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
            skipped = any(float(v.item()) > 0 for v in found.values())
            scaler.step(opt)
            if not skipped:  # GMMPrior skips the mixture's step whenever the scaler skips the network's
                mopt.step()
            scaler.update()
    return model, mix, (scaler.get_scale() if scaler is not None else None)


class ScaleAtEnd(pl.Callback):
    """The precision plugin's GradScaler scale at the end of training (``None`` without a scaler)."""

    scale: float | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale = scaler.get_scale() if scaler is not None else None


@pytest.mark.parametrize(("method", "kernel"), [("exact", "auto"), ("table", "auto"), ("table", "torch")])
@pytest.mark.parametrize(
    ("device", "precision"),
    [
        ("cpu", "32-true"),
        ("cpu", "bf16-mixed"),
        pytest.param("cuda", "32-true", marks=[CUDA, pytest.mark.gpu]),
        pytest.param("cuda", "bf16-mixed", marks=[CUDA, pytest.mark.gpu]),
        pytest.param("cuda", "16-mixed", marks=[CUDA, pytest.mark.gpu]),  # fp16 + GradScaler exists on CUDA only
    ],
)
def test_gmm_prior_equals_one_backward_on_the_device(trainer_kwargs: dict[str, Any], device: str, precision: str,
                                                     method: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_kernel_calls(monkeypatch)
    model = Plain()
    cb = GMMPrior(**prior_kwargs(method=method, kernel=kernel))
    seen: dict[str, Any] = {}

    class Where(pl.Callback):  # after GMMPrior's hook: the gradient it added lives on the weights' device
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            w = layer_weights(pl_module)[0]
            seen["weights"] = w.device.type
            seen["grad"] = w.grad.device.type if w.grad is not None else None
            seen["mixture"] = cb.mixture.free_means.device.type

    scale_cb = ScaleAtEnd()
    pl.Trainer(callbacks=[cb, Where(), scale_cb],
               **on(trainer_kwargs, device, precision=precision, max_steps=STEPS, max_epochs=-1)).fit(model, loader())
    assert seen == {"weights": device, "grad": device, "mixture": device}
    assert bool(calls) == uses_kernel(device, method, kernel)  # the path under test is the one that ran
    ref_model, ref_mix, ref_scale = reference_on(device, precision, method=method, kernel=kernel)
    # 16-mixed: both ran the GradScaler and neither skipped a step (a skip halves the scale from 2**16), so the
    # comparison is of real updates
    assert scale_cb.scale == ref_scale == (65536.0 if precision == "16-mixed" else None)
    # Tolerances as tests/test_gmm_prior.py: the callback's float32 prior gradient (exact: chunked; table: interpolated,
    # ~5e-5 relative) against the float64 reference, 1e-6 for exact fp32 and 1e-5 otherwise. Under autocast the
    # network's own part of the step is the same kernels in both runs; a weight moved by ~1e-7 by the prior's float32
    # rounding can round to another bf16/fp16 value in the next forward, which 1e-5 covers (as the CPU bf16 test).
    tol = 1e-6 if method == "exact" and precision == "32-true" else 1e-5
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=tol, atol=tol, msg=name)
    for (name, a), b in zip(cb.mixture.named_parameters(), ref_mix.parameters(), strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=tol, atol=tol, msg=name)
    trained = layer_weights(model)[0].detach().cpu()
    assert not torch.allclose(layer_weights(Plain())[0].detach(), trained)  # training moved it
    # the prior did act: without it the weights end elsewhere
    no_prior, _, _ = reference_on(device, precision, method=method, kernel=kernel, tau=0.0)
    assert not torch.allclose(layer_weights(no_prior)[0].detach().cpu(), trained, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# 2. The prior's gradient for ~100k weights on the device, through the callback, against float64 exact
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "kernel"), [("exact", "auto"), ("table", "auto"), ("table", "torch")])
@pytest.mark.parametrize("device", DEVICES)
def test_prior_gradient_on_the_device_within_1e4_of_float64_exact(device: str, method: str, kernel: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    n_out, n_in = 250, 400  # 100k weights: half near zero, half spread
    half = n_out * n_in // 2
    w = torch.cat([0.01 * torch.randn(half, generator=g), 0.3 * torch.randn(half, generator=g)])
    layer = nn.Linear(n_in, n_out, bias=False).to(device)
    with torch.no_grad():
        layer.weight.copy_(w.view(n_out, n_in))
    cb = GMMPrior(num_components=8, pi_zero=0.9, init_std=0.05, method=method, kernel=kernel, save_weights=False)
    mix = cb.mixture
    with torch.no_grad():  # a mixture with a narrow zero component (std 0.01, the hard case for the table)
        mix.free_means.copy_(torch.linspace(-0.6, 0.6, 8) + 0.02 * torch.randn(8, generator=g))
        mix.log_precisions.copy_(-2 * torch.cat([torch.tensor([0.01]), 0.03 + 0.1 * torch.rand(8, generator=g)]).log())
        mix.mixing_logits.copy_(torch.randn(8, generator=g))
    mix.to(device=device, dtype=torch.float32)
    cb._params = {"weight": cast(nn.Parameter, layer.weight)}  # as on_fit_start sets them
    cb.num_weights = layer.weight.numel()
    scale = 0.5
    calls = count_kernel_calls(monkeypatch)
    cb.apply_prior_gradient(scale=scale)
    assert bool(calls) == uses_kernel(device, method, kernel)
    grad = layer.weight.grad
    assert grad is not None and grad.device.type == device and grad.dtype == torch.float32
    # the exact float64 gradient of -sum log p(w), on the CPU, from the same mixture in float64
    means, lp, lpi = (torch.from_numpy(a) for a in mix.host_mixture())
    exact = mixture_nll_grad([layer.weight.detach().cpu().double()], means, lp, lpi)
    ref = scale * exact.grad_w[0]
    rel = float((grad.detach().cpu().double() - ref).norm() / ref.norm())
    assert rel < 1e-4, rel
    # the mixture's gradients (set by the callback, scale * d nll + hyper-prior), same requirement
    ref_mix = copy.deepcopy(mix).cpu().double()
    for q in ref_mix.parameters():
        q.grad = None
    ref_mix.loss([layer.weight.detach().cpu().double()], scale=scale).backward()
    for (name, p), q in zip(mix.named_parameters(), ref_mix.parameters(), strict=True):
        assert p.grad is not None and p.grad.device.type == device, name
        r = float((p.grad.cpu().double() - q.grad).norm() / q.grad.norm())  # type: ignore[operator, union-attr]
        assert r < 1e-4, (name, r)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Distiller on the device: teacher placement, frozen, not checkpointed, hooks gone; same weights as on a CPU
# ----------------------------------------------------------------------------------------------------------------------


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)  # SGD: no Adam normalisation amplifying rounding


def _distill(device: str, mode: str, trainer_kwargs: dict[str, Any], tmp_path: Path
             ) -> tuple[Distiller, MLP, dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    teacher = MLP(64, (32, 16), 10, input_shape=(1, 8, 8))
    t_before = cpu_state(teacher)
    torch.manual_seed(1)
    if mode == "layerwise":  # narrower student: FitNets adapters, which must follow the module to the device too
        distiller = Distiller(MLP(64, (12, 6), 10, input_shape=(1, 8, 8)), teacher, optimizer=_sgd, mode="layerwise",
                              layers={"fc1": "fc1", "fc2": "fc2"}, layerwise_schedule="joint")
        assert len(distiller.adapters) == 2
    else:
        distiller = Distiller(MLP(64, (16,), 10), teacher, optimizer=_sgd, loss="kd", temperature=2.0, alpha=0.1)
    seen: dict[str, str] = {}

    class Where(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen["student"] = next(pl_module.student.parameters()).device.type
            seen["teacher"] = next(pl_module.teacher.parameters()).device.type
            seen["batch"] = batch[0].device.type
            seen["hooks"] = str(mode == "end_to_end" or has_hooks(pl_module.teacher))  # attached for the fit

    trainer = pl.Trainer(callbacks=[Where()],
                         **on(trainer_kwargs, device, max_steps=5, max_epochs=-1, limit_val_batches=0))
    trainer.fit(distiller, random_loader(n=160, shape=(1, 8, 8), batch=32))
    ckpt = tmp_path / f"{device}-{mode}.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return distiller, teacher, t_before, seen, state


@pytest.mark.parametrize("mode", ["end_to_end", "layerwise"])
@pytest.mark.parametrize("device", DEVICES)
def test_distiller_on_the_device(device: str, mode: str, trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    distiller, teacher, t_before, seen, state = _distill(device, mode, trainer_kwargs, tmp_path)
    assert seen == {"student": device, "teacher": device, "batch": device, "hooks": "True"}
    # frozen: unchanged, eval, no gradients; not in the checkpoint; no hook left after fit
    for k, v in cpu_state(teacher).items():
        assert torch.equal(v, t_before[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert state and not any(k.startswith("teacher") or k.startswith("_teacher") for k in state)
    assert {k for k in state if k.startswith("student.")} == {f"student.{k}" for k in distiller.student.state_dict()}
    assert not has_hooks(teacher) and not has_hooks(distiller.student)
    # the student trained, and as the same run on a CPU (TF32 off; float32 summation order differs: 1e-5)
    torch.manual_seed(1)
    fresh = MLP(64, (12, 6) if mode == "layerwise" else (16,), 10)
    after = cpu_state(distiller)
    assert not torch.equal(after["student.fc1.weight"], fresh.get_parameter("fc1.weight").detach())
    on_cpu, *_ = _distill("cpu", mode, trainer_kwargs, tmp_path)
    for k, v in cpu_state(on_cpu).items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------------------------------------------------
# 4. The compressed file of a model trained and quantized on the device
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_compressed_file_from_the_device_loads_anywhere(device: str, trainer_kwargs: dict[str, Any],
                                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PlainDigits()
    seen: dict[str, str] = {}

    class Where(pl.Callback):  # runs before PruneQuantize's on_train_end: the compression starts on the device
        def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen["model"] = next(pl_module.model.parameters()).device.type

    pq = PruneQuantize(bits_fc=4, finetune_epochs=1, finetune_batches=2)
    trainer = pl.Trainer(callbacks=[MagnitudePruning(quality=0.8), Where(), pq],
                         **on(trainer_kwargs, device, max_epochs=2, limit_train_batches=5))
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert seen == {"model": device}
    path = tmp_path / "model.dstl"
    assert path.exists()
    quantized = module.model.to(device).eval()  # the in-memory quantized (and fine-tuned) model
    for name in ("fc1.weight", "fc2.weight"):
        w = quantized.get_parameter(name)
        assert torch.unique(w).numel() <= 2**4 and float((w == 0).float().mean()) > 0.3, name  # shared and pruned
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = quantized(x.to(device))
        expected_cpu = copy.deepcopy(quantized).cpu()(x)
    for where in {device, "cpu"}:
        loaded = load_compressed(path, map_location=where)
        assert not loaded.training
        mine = quantized.state_dict()
        assert set(loaded.state_dict()) == set(mine)
        for k, v in loaded.state_dict().items():
            assert v.device.type == where, k
            assert torch.equal(v.cpu(), mine[k].cpu()), k  # identical weights
        with torch.no_grad():
            out = loaded(x.to(where))
        # identical outputs: the same weights through the same kernels on the same device
        assert torch.equal(out, expected if where == device else expected_cpu), where


# ----------------------------------------------------------------------------------------------------------------------
# 5. MagnitudePruning's zeros hold on the device
# ----------------------------------------------------------------------------------------------------------------------


class RecordZeros(ZeroWatcher):
    """:class:`ZeroWatcher` that only records the zeros; another callback checks them (``on_train_batch_end``)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pass


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("device", DEVICES)
def test_pruned_weights_stay_exactly_zero_on_the_device(device: str, optimizer: str,
                                                        trainer_kwargs: dict[str, Any]) -> None:
    loaders: tuple[DataLoader, DataLoader] = (random_loader(64, (16,), 4, 16), random_loader(32, (16,), 4, 16))
    # control: zeroing once by hand is undone by the momentum / weight decay state built in epoch 0
    control = ZeroWatcher(watch_epoch=1, zero_by_hand=True)
    pl.Trainer(callbacks=[control], **on(trainer_kwargs, device, max_epochs=2)).fit(PlainPruning(optimizer), *loaders)
    assert sum(control.violations) > 0
    # with the callback the zeros hold after every optimizer step, even checked before the callback re-applies its
    # masks: the masked gradients and optimizer state keep them at zero on their own
    pruning = MagnitudePruning(sparsity=0.5, prune_epochs=[1])
    watcher = RecordZeros(watch_epoch=1)  # after the pruning callback: records the zeros it made at epoch 1's start
    seen: dict[str, str] = {}

    class Check(pl.Callback):  # before the pruning callback: checks after each step, before it re-applies its masks
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            ZeroWatcher.on_train_batch_end(watcher, trainer, pl_module, *args)
            seen.update({n: m.device.type for n, m in pruning.masks.items()})

    model = PlainPruning(optimizer)
    pl.Trainer(callbacks=[Check(), pruning, watcher], **on(trainer_kwargs, device, max_epochs=3)).fit(model, *loaders)
    assert len(watcher.violations) == 2 * 4 * 2 and sum(watcher.violations) == 0  # 2 epochs x 4 steps x 2 layers
    assert seen == {"net.1.weight": device, "net.3.weight": device}
    for name, zeros in watcher.zeros.items():
        p = model.get_parameter(name).detach()
        assert 0.4 < float(zeros.float().mean()) < 0.6, name  # half pruned
        assert bool((p[zeros.cpu()] == 0).all()) and bool((p[~zeros.cpu()] != 0).all()), name  # the rest trained
