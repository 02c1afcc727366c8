"""Distillation losses against float64 naive references written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import feature_mse, kd_kl, softmax_mse, weighted_distillation


def _softmax(row: list[float], t: float) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _ref_softmax_mse(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for sr, tr in zip(s.tolist(), t.tolist(), strict=True):
        ps, pt = _softmax(sr, temp), _softmax(tr, temp)
        total += sum((a - b) ** 2 for a, b in zip(ps, pt, strict=True))
    return total / len(s)


def _ref_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for sr, tr in zip(s.tolist(), t.tolist(), strict=True):
        ps, pt = _softmax(sr, temp), _softmax(tr, temp)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return temp**2 * total / len(s)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(7, 5, generator=g, dtype=torch.float64) * 3, torch.randn(
        7, 5, generator=g, dtype=torch.float64
    ) * 3


@pytest.mark.parametrize("temp", [1.0, 2.5, 20.0])
def test_softmax_mse_matches_reference(logits: tuple[torch.Tensor, torch.Tensor], temp: float) -> None:
    s, t = logits
    assert softmax_mse(s, t, temp).item() == pytest.approx(_ref_softmax_mse(s, t, temp), rel=1e-10, abs=1e-14)


def test_softmax_mse_hand_computed() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2] -> (1/4)^2 + (1/4)^2 = 1/8
    s = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    assert softmax_mse(s, t, 1.0).item() == pytest.approx(0.125)
    # T = 2 halves the logits: softmax([0, ln 3 / 2]) = [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    p = 1 / (1 + math.sqrt(3))
    assert softmax_mse(s, t, 2.0).item() == pytest.approx(2 * (p - 0.5) ** 2)


@pytest.mark.parametrize("temp", [1.0, 4.0, 10.0])
def test_kd_kl_matches_reference(logits: tuple[torch.Tensor, torch.Tensor], temp: float) -> None:
    s, t = logits
    assert kd_kl(s, t, temp).item() == pytest.approx(_ref_kd(s, t, temp), rel=1e-10)


def test_kd_kl_hand_computed_and_t2_scaling() -> None:
    s = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p_s = [1/4, 3/4]
    t = torch.zeros(1, 2, dtype=torch.float64)  # p_t = [1/2, 1/2]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_kl(s, t, 1.0).item() == pytest.approx(expected)
    # The T^2 factor: for logits scaled by T, softened distributions are the same, and the loss is T^2 larger.
    assert kd_kl(s * 3, t * 3, 3.0).item() == pytest.approx(9 * expected)


def test_losses_vanish_on_equal_logits(logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    s, _ = logits
    assert softmax_mse(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-15)
    assert kd_kl(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-12)


def test_feature_mse_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
    )
    ref = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist(), strict=True)) / a.numel()
    assert feature_mse(a, b).item() == pytest.approx(ref, rel=1e-12)


def test_gradients_flow_to_student_only(logits: tuple[torch.Tensor, torch.Tensor]) -> None:
    s, t = logits
    s = s.clone().requires_grad_(True)
    softmax_mse(s, t, 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_weighted_distillation() -> None:
    d, ce = torch.tensor(2.0), torch.tensor(10.0)
    assert weighted_distillation(d, ce, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 10)
    assert weighted_distillation(d, None, 0.0).item() == 2.0
    with pytest.raises(ValueError, match="alpha must be in"):
        weighted_distillation(d, ce, 1.5)
    with pytest.raises(ValueError, match="no ce_loss"):
        weighted_distillation(d, None, 0.5)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        softmax_mse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="2-D"):
        kd_kl(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="adapter"):
        feature_mse(torch.zeros(2, 3), torch.zeros(2, 5))
