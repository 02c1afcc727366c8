"""The Deep Compression recipes parse, and the cyclic learning-rate schedule of the VGG recipe is right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.compress.schedules import CyclicMultiStepLR

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    "configs/mnist/lenet300_100_deep_compression.yaml",
    "configs/mnist/lenet5_caffe_deep_compression.yaml",
    "configs/cifar10/vgg19bn_deep_compression.yaml",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_builds(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.callbacks

    if not hasattr(distill.callbacks, "LoadWeights"):
        pytest.skip("distill.callbacks.LoadWeights (another issue) is not merged yet")
    from distill.callbacks import MagnitudePruning, PruneQuantize
    from distill.cli import DistillCLI

    monkeypatch.chdir(tmp_path)
    cli = DistillCLI(args=["-c", str(REPO / config), "--trainer.logger", "false"], run=False)
    kinds = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert kinds.index("LoadWeights") < kinds.index("MagnitudePruning") < kinds.index("PruneQuantize")
    assert any(isinstance(cb, MagnitudePruning) for cb in cli.trainer.callbacks)
    assert any(isinstance(cb, PruneQuantize) for cb in cli.trainer.callbacks)


def test_cyclic_multistep_schedule() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = CyclicMultiStepLR(opt, period=20, milestones=[3, 10, 16], lrs=[0.005, 0.05, 0.01, 0.001])
    lrs = []
    for _ in range(45):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.005] * 3 + [0.05] * 7 + [0.01] * 6 + [0.001] * 4
    assert lrs == pytest.approx(expected * 2 + expected[:5])
    with pytest.raises(ValueError, match="lrs must hold len"):
        CyclicMultiStepLR(opt, period=20, milestones=[3], lrs=[0.1])
    with pytest.raises(ValueError, match="milestones must be increasing"):
        CyclicMultiStepLR(opt, period=20, milestones=[10, 3], lrs=[0.1, 0.1, 0.1])
