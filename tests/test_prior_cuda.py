"""The fused CUDA prior kernel's arithmetic (distill.prior_cuda), run by Triton's interpreter on the CPU.

On a GPU the same kernel is compiled (tests/test_cuda.py checks it there, inside the callback); here
``TRITON_INTERPRET=1`` runs it on CPU tensors in a subprocess (the variable is read as the kernel is defined),
against the float64 reference ``distill.priors.mixture_nll_grad``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
# Triton 3.6's interpreter fails on the kernel's strided program loop (a 1-element array where range() takes an int);
# the compiled kernel runs there (tests/test_cuda.py); 3.8, the one torch 2.14 brings, interprets it
pytestmark = pytest.mark.skipif(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7),
                                reason="Triton < 3.7's interpreter cannot run the kernel's program loop")

SCRIPT = textwrap.dedent(
    """
    import json, math
    import torch
    from distill import prior_cuda
    from distill.priors import _component_log_terms, _mixture_param_grads, mixture_nll_grad

    torch.manual_seed(0)
    k = 17
    w1 = torch.randn(3001) * 0.1
    w1[:1500] *= 0.01  # many near the narrow zero component
    w2 = (torch.randn(40, 33) * 0.05).bfloat16()  # a 16-bit tensor: its gradient stays bf16
    means = torch.linspace(-0.3, 0.3, k, dtype=torch.float64)
    means[0] = 0.0
    lp = torch.full((k,), 2 * math.log(1 / 0.05), dtype=torch.float64)
    lp[0] = 2 * math.log(1 / 0.01)
    lpi = torch.log_softmax(torch.randn(k, dtype=torch.float64), 0)
    const, prec = _component_log_terms(means, lp, lpi)
    comp = prior_cuda.components(means, prec, const, torch.device("cpu"))
    out = torch.zeros(1 + 3 * k, dtype=torch.float64)
    g1 = torch.full_like(w1, 0.25)  # the kernel adds to what is there
    g2 = torch.zeros_like(w2)
    prior_cuda.accumulate(w1, g1, comp, out, 0.5)
    prior_cuda.accumulate(w2, g2, comp, out, 0.5)
    ref = mixture_nll_grad([w1.double(), w2.double()], means, lp, lpi)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    gm, gl, gp = _mixture_param_grads(tuple(out[1:].reshape(3, -1)), prec)
    print(json.dumps({
        "grad": rel(g1 - 0.25, 0.5 * ref.grad_w[0]),
        "grad_bf16": rel(g2.float(), 0.5 * ref.grad_w[1]),
        "g2_dtype": str(g2.dtype),
        "nll": abs(float(out[0]) - float(ref.nll)) / abs(float(ref.nll)),
        "means": rel(gm, ref.grad_means),
        "log_precisions": rel(gl, ref.grad_log_precisions),
        "log_pis": rel(gp, ref.grad_log_pis),
    }))
    """
)


def test_fused_kernel_matches_the_float64_reference() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    err = json.loads(done.stdout.strip().splitlines()[-1])
    assert err.pop("g2_dtype") == "torch.bfloat16"
    assert err.pop("grad_bf16") < 1e-2  # the sum rounded to bf16 (8 bits of mantissa)
    for name, value in err.items():
        assert value < 1e-5, (name, value)


def test_accumulate_rejects_what_it_cannot_take() -> None:
    import torch

    from distill import prior_cuda

    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="components"):
        prior_cuda.accumulate(w, w.clone(), torch.zeros(3 * 65), torch.zeros(1 + 3 * 65, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        prior_cuda.accumulate(w.t(), w.clone(), torch.zeros(3 * 17), torch.zeros(52, dtype=torch.float64), 1.0)
    assert not prior_cuda.available(torch.device("cpu"))


def test_a_gpu_the_kernel_cannot_run_on_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from distill import prior_cuda

    monkeypatch.setattr(prior_cuda, "_probe", lambda index: "CompilationError: sm_60 is not supported")
    monkeypatch.setattr(prior_cuda, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"does not run on cuda:3 \(CompilationError: sm_60.*ATen ops"):
        assert not prior_cuda.available(torch.device("cuda", 3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per device
        assert not prior_cuda.available(torch.device("cuda", 3))


def test_the_probe_reports_a_failure_as_one_line() -> None:
    import torch

    from distill import prior_cuda

    if torch.cuda.is_available():
        assert prior_cuda._probe.__wrapped__(torch.cuda.current_device()) is None  # compiles and runs here
        return
    msg = prior_cuda._probe.__wrapped__(0)  # no GPU: the probe's first CUDA allocation fails, and says so
    assert msg is not None and msg.startswith(("RuntimeError: ", "AssertionError: ", "AcceleratorError: "))
    assert "\n" not in msg and len(msg) <= 300


def test_weights_pair_with_their_gradients_in_memory_order() -> None:
    """What GMMPrior hands the fused kernel: flat views of a weight and its gradient in the same order (contiguous,
    or both channels_last), never a copy; any other layout keeps the ATen path."""
    import torch

    from distill.callbacks.gmm_prior import _flat_pair

    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    w.grad = torch.zeros_like(w)  # keeps channels_last
    pair = _flat_pair(w)
    assert pair is not None
    fw, fg = pair
    assert fw.data_ptr() == w.data_ptr() and fg.data_ptr() == w.grad.data_ptr()
    fg += fw  # elementwise through the views = elementwise on the tensors
    torch.testing.assert_close(w.grad, w.detach(), rtol=0, atol=0)
    w.grad = torch.zeros(4, 3, 5, 5)  # contiguous gradient of a channels_last weight: another order
    assert _flat_pair(w) is None
    v = torch.nn.Parameter(torch.randn(6, 8).t())  # a transposed view: neither layout
    v.grad = torch.zeros_like(v)
    assert _flat_pair(v) is None
    u = torch.nn.Parameter(torch.randn(6, 8))
    assert _flat_pair(u) is None  # no gradient yet
    u.grad = torch.zeros_like(u)
    pair = _flat_pair(u)
    assert pair is not None and pair[0].data_ptr() == u.data_ptr()  # contiguous: plain flat views


CALLBACK_SCRIPT = textwrap.dedent(
    """
    import copy, json
    import torch
    from torch import nn
    from distill import prior_cuda
    from distill.callbacks import GMMPrior
    from distill.callbacks.gmm_prior import _flat_pair
    from distill.priors import mixture_nll_grad

    torch.manual_seed(0)
    fc = nn.Linear(40, 30, bias=False)
    conv = nn.Conv2d(3, 8, 3, bias=False).to(memory_format=torch.channels_last)
    cb = GMMPrior(num_components=6, pi_zero=0.9, init_std=0.05, method="exact", save_weights=False)
    mix = cb.mixture
    with torch.no_grad():
        mix.free_means.copy_(torch.linspace(-0.3, 0.3, 6))
        mix.mixing_logits.copy_(torch.randn(6))
    cb._params = {"fc.weight": fc.weight, "conv.weight": conv.weight}
    cb.num_weights = fc.weight.numel() + conv.weight.numel()
    conv.weight.grad = torch.zeros_like(conv.weight)  # channels_last, as autograd leaves it
    calls = []
    real = prior_cuda.accumulate
    prior_cuda.accumulate = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    cb._cuda_views = lambda params, k: [_flat_pair(p) for p in params]  # the CUDA path on CPU tensors (interpreter)
    loss = cb.apply_prior_gradient(scale=0.5, grad_scale=4.0)
    weights = [fc.weight.detach().double(), conv.weight.detach().double()]
    means, lp, lpi = (torch.from_numpy(a) for a in mix.host_mixture())
    exact = mixture_nll_grad(weights, means, lp, lpi)
    got = torch.cat([fc.weight.grad.reshape(-1), conv.weight.grad.reshape(-1)]).double()
    ref = 2.0 * torch.cat([g.reshape(-1) for g in exact.grad_w])  # scale 0.5 x grad_scale 4
    ref_mix = copy.deepcopy(mix).double()
    for q in ref_mix.parameters():
        q.grad = None
    ref_loss = ref_mix.loss(weights, scale=0.5)
    ref_loss.backward()
    out = {"calls": len(calls), "weights": float((got - ref).norm() / ref.norm()),
           "conv_layout_kept": conv.weight.grad.is_contiguous(memory_format=torch.channels_last),
           "loss": abs(loss - float(ref_loss)) / abs(float(ref_loss))}
    for (name, p), q in zip(mix.named_parameters(), ref_mix.parameters()):
        if q.grad is not None:
            out[name] = float((p.grad.double() - q.grad).norm() / q.grad.norm())  # not scaled by grad_scale
    print(json.dumps(out))
    """
)


def test_the_callbacks_cuda_path_on_cpu_tensors() -> None:
    """GMMPrior's CUDA path (``_cuda_pass``: the packed mixture, flat views of a contiguous and a channels_last
    weight, the sums read back, the mixture's chain rule, AMP's ``grad_scale`` on the weights only) run through
    Triton's interpreter on the CPU, against the float64 gradients of (0.5 x prior) for the mixture and of
    (0.5 x 4 x prior) for the weights."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    err = json.loads(done.stdout.strip().splitlines()[-1])
    assert err.pop("calls") == 2 and err.pop("conv_layout_kept") is True
    assert {"weights", "loss", "free_means", "log_precisions", "mixing_logits"} <= set(err)
    for name, value in err.items():
        assert value < 1e-5, (name, value)
