"""Distillation losses as pure functions of tensors (no modules, no state).

* :func:`softmax_mse`: the squared distance between temperature-softened softmaxes of student and teacher, the
  loss of the source design (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014, regress on the teacher's
  outputs; Hinton et al. 2015, section 2.1, show that matching softened outputs approaches logit matching as the
  temperature grows).
* :func:`kd_kl`: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015): the KL divergence
  from the teacher's softened distribution to the student's, scaled by :math:`T^2` so that its gradients keep the
  same magnitude as the temperature changes.
* :func:`feature_mse`: the hint loss of Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), the mean
  squared error between a (possibly regressed) student feature map and the teacher's.
* :func:`weighted_distillation`: ``(1 - alpha) * distill + alpha * cross_entropy`` (Hinton et al. 2015, section 2:
  "a weighted average of two different objective functions").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["feature_mse", "kd_kl", "softmax_mse", "weighted_distillation"]


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; both must be (batch, classes)"
        )
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (batch, classes), got shape {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Squared distance between the temperature-softened softmaxes, summed over classes, averaged over the batch.

    .. math::
        \\mathcal{L} = \\frac{1}{B} \\sum_{b=1}^{B} \\sum_{k=1}^{K}
            \\big(\\mathrm{softmax}(z^s_b / T)_k - \\mathrm{softmax}(z^t_b / T)_k\\big)^2

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits (no gradient needed).
        temperature: softening temperature :math:`T > 0`.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if the shapes differ or are not 2-D, or ``temperature <= 0``.
    """
    _check_logits(student_logits, teacher_logits, temperature)
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return (p_s - p_t).pow(2).sum(dim=1).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's knowledge-distillation loss: :math:`T^2 \\, \\mathrm{KL}(p^t_T \\,\\|\\, p^s_T)`, batch mean.

    .. math::
        \\mathcal{L} = \\frac{T^2}{B} \\sum_{b} \\sum_{k} p^t_{bk}
            \\big(\\log p^t_{bk} - \\log p^s_{bk}\\big), \\qquad p_{bk} = \\mathrm{softmax}(z_b / T)_k

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits.
        temperature: softening temperature :math:`T > 0`.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if the shapes differ or are not 2-D, or ``temperature <= 0``.
    """
    _check_logits(student_logits, teacher_logits, temperature)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def feature_mse(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error over every element of two equally shaped feature tensors.

    Args:
        student_features: the student's (regressed) features, any shape.
        teacher_features: the teacher's features, the same shape.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if the shapes differ.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student and teacher features differ in shape: {tuple(student_features.shape)} vs "
            f"{tuple(teacher_features.shape)}; map the student's features with an adapter first"
        )
    return F.mse_loss(student_features, teacher_features)


def weighted_distillation(distill_loss: torch.Tensor, ce_loss: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * distill_loss + alpha * ce_loss``; ``ce_loss`` may be ``None`` when ``alpha == 0``.

    Raises:
        ValueError: if ``alpha`` is outside ``[0, 1]`` or ``ce_loss`` is missing while ``alpha > 0``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return distill_loss
    if ce_loss is None:
        raise ValueError(f"alpha={alpha} weights a cross-entropy term, but no ce_loss was given")
    return (1.0 - alpha) * distill_loss + alpha * ce_loss
