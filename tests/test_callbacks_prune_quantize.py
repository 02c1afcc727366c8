"""PruneQuantize in a plain LightningModule, trained quantization, and the distill compress/evaluate commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from distill.callbacks import GMMPrior, MagnitudePruning, PruneQuantize
from distill.compress import SharedWeights, finetune_centroids, finetune_weights, load_compressed, read_header
from distill.compress.cli import compress_main, evaluate_main
from distill.compress.pipeline import deep_compress
from distill.compress.quantize import quantize_model
from distill.data import DigitsDataModule
from models import MLP


class PlainDigits(pl.LightningModule):
    """A plain module holding a zoo network as ``model``; knows nothing about compression."""

    def __init__(self) -> None:
        super().__init__()
        self.model = MLP(64, (48,), 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_prune_quantize_writes_the_file_reports_and_decoded_accuracy(
    trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    pq = PruneQuantize(bits_fc=4, finetune_epochs=1, finetune_batches=3)
    module = PlainDigits()
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 4}, callbacks=[MagnitudePruning(quality=0.8), pq])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.dstl", "compression_report.json", "compression_report.md", "accuracy.json"} <= files
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert acc["before"] > 0.8 and acc["decoded"] == acc["quantized"] and acc["decoded"] > 0.7
    loaded = load_compressed(tmp_path / "model.dstl")
    for k, v in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu())
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert [r["name"] for r in report["layers"]] == ["fc1.weight", "fc2.weight"]
    assert all(r["sparsity"] > 0.3 for r in report["layers"])  # the pruning masks survived quantization
    assert report["totals"]["file_bytes"] == (tmp_path / "model.dstl").stat().st_size
    assert read_header(tmp_path / "model.dstl")["meta"]["bits_fc"] == 4
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.unique(module.model.get_parameter(name)).numel() <= 2**4  # 15 shared values + zero
    assert pq.output_paths()["compressed model"] == str(tmp_path / "model.dstl")


def test_prune_quantize_float16_raw_tensors(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    pq = PruneQuantize(bits_fc=4, raw_dtype="float16")
    module = PlainDigits()
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 2}, callbacks=[MagnitudePruning(quality=0.8), pq])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    header = read_header(tmp_path / "model.dstl")
    enc = {r["name"]: (r["encoding"], r["length"]) for r in header["tensors"]}
    assert enc["fc1.bias"] == ("raw-f16", 2 * 48) and enc["fc2.bias"] == ("raw-f16", 2 * 10)
    assert enc["fc1.weight"][0] == "huffman-sparse" and header["meta"]["raw_dtype"] == "float16"
    bias = module.model.fc1.bias.detach()
    assert torch.equal(bias, bias.half().float()) and bias.abs().sum() > 0  # rounded in memory, not zeroed
    loaded = load_compressed(tmp_path / "model.dstl")
    for k, v in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k  # the decoded model is the evaluated one
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert acc["decoded"] == acc["quantized"]


class CountingGMMPrior(GMMPrior):
    """The real soft weight-sharing callback, counting how often it is asked to quantize."""

    calls = 0

    def quantize(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        self.calls += 1
        return super().quantize(pl_module)


def test_prune_quantize_uses_a_gmm_prior_codebook(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    gmm = CountingGMMPrior(num_components=4, quantize_on_end=False, log_histograms=False)
    module = PlainDigits()
    trainer = pl.Trainer(
        **{**trainer_kwargs, "max_epochs": 1, "limit_train_batches": 2}, callbacks=[gmm, PruneQuantize()]
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert gmm.calls == 1  # PruneQuantize asked the prior to quantize, and used its codebook instead of k-means
    header = read_header(tmp_path / "model.dstl")
    assert header["meta"]["codebook_source"] == "GMMPrior"
    assert all(r["codebook"] <= 4 for r in header["tensors"] if r["encoding"] == "huffman-sparse")
    allowed = torch.cat([torch.zeros(1), gmm.mixture.means.detach().float()])
    w = load_compressed(tmp_path / "model.dstl").fc1.weight
    assert torch.isin(w, allowed).all()  # every stored weight is the zero or a (merged) component mean


def test_prune_quantize_kmeans_codebooks_over_the_priors_zeros(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    gmm = CountingGMMPrior(num_components=4, quantize_on_end=False, log_histograms=False, pi_zero=0.5, init_std=0.05)
    module = PlainDigits()
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 2, "limit_train_batches": 4},
                         callbacks=[gmm, PruneQuantize(bits_fc=3, codebook="kmeans")])
    expected_zero = {}

    def record(*args: Any) -> None:  # what the prior's zero component owns when compression starts
        expected_zero.update({n: m == 0 for n, m in gmm._kept_masks("test").items()})

    trainer.callbacks.insert(1, pl.Callback())
    trainer.callbacks[1].on_train_end = record  # type: ignore[method-assign]
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert gmm.calls == 0  # not the prior's codebook
    assert gmm.masks == {} and gmm.pruned is None  # zero_members() holds no masks and records no prune
    merged = json.loads((tmp_path / "gmm_history.json").read_text())["merged"]
    assert merged["means"][0] == 0.0 and abs(sum(merged["pis"]) - 1.0) < 1e-6  # the mixture that chose the zeros
    header = read_header(tmp_path / "model.dstl")
    assert header["meta"]["codebook_source"] == "GMMPrior zeros, kmeans" and header["meta"]["bits_fc"] == 3
    decoded = load_compressed(tmp_path / "model.dstl")
    for name in ("fc1.weight", "fc2.weight"):
        w = decoded.get_parameter(name)
        zero = expected_zero["model." + name]
        assert 0 < int(zero.sum()) < w.numel(), name  # the prior pruned some, not all
        assert torch.equal(w == 0, zero), name  # exactly the prior's zeros, no more, no fewer
        assert torch.unique(w[w != 0]).numel() <= 2**3, name  # k-means: at most 8 shared values per layer
    means = torch.cat([torch.zeros(1), gmm.mixture.means.detach().float()])
    assert not torch.isin(decoded.fc1.weight, means).all()  # not the mixture's means


def test_prune_quantize_without_test_data_skips_accuracy(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    from tests.conftest import random_loader

    pq = PruneQuantize(quality=1.0)
    trainer = pl.Trainer(**{**trainer_kwargs, "limit_train_batches": 1}, callbacks=[pq])
    trainer.fit(PlainDigits(), random_loader(32, (1, 8, 8), 10, 16))
    assert json.loads((tmp_path / "accuracy.json").read_text()) == {"before": None, "quantized": None, "decoded": None}
    assert "no datamodule" in (pq.note or "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits_conv": 0}, "bits must be an integer in 1..16, got 0"),
        ({"bits_fc": 17}, "bits must be an integer in 1..16, got 17"),
        ({"quality": 1.0, "sparsity": 0.5}, "not both"),
        ({"sparsity": 2.0}, r"sparsity must be in \[0, 1\]"),
        ({"finetune_epochs": -1}, "finetune_epochs must be >= 0"),
        ({"raw_dtype": "int8"}, "raw_dtype must be one of"),
        ({"codebook": "huffman"}, "codebook must be one of"),
        ({"finetune": "biases"}, r"finetune must be one of \('centroids', 'weights'\)"),
    ],
)
def test_prune_quantize_misconfiguration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneQuantize(**kwargs)


def test_trained_quantization_gradient_is_sum_over_members() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3))
    labels = torch.randint(0, 4, (3, 6))  # 0 = pruned
    codebook = torch.tensor([0.0, -0.5, 0.1, 0.7])
    with torch.no_grad():
        net[0].weight.copy_(codebook[labels])
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    dense = net[0].weight.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(F.linear(x, dense, net[0].bias), y)
    (grad,) = torch.autograd.grad(loss, dense)
    lr = 0.3
    out = finetune_centroids(net, {"0.weight": SharedWeights(codebook, labels)}, [(x, y)], epochs=1, lr=lr)
    for k in (1, 2, 3):
        expected = codebook[k] - lr * grad[labels == k].sum()
        assert out["0.weight"].codebook[k].item() == pytest.approx(expected.item(), abs=1e-6)
    w = net[0].weight.detach()
    assert torch.equal(w, out["0.weight"].codebook[labels]) and not w[labels == 0].any()


def _digits_net_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A small MLP trained on scikit-learn's digits, and the training batches."""
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=128)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    net = MLP(64, (48,), 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(15):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return net, batches


def _mean_loss(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(net(x), y)) for x, y in batches) / len(batches)


def test_weight_finetuning_keeps_the_sharing_and_the_zeros_and_recovers_more_than_centroids_at_two_bits() -> None:
    """``finetune_weights``: every layer stays ``codebook[labels]`` with at most 2^bits - 1 shared values, the
    pruned weights stay zero, and at 2 bits it lowers the training loss of the shared network further than Han's
    centroid training does in the same epochs."""
    trained, batches = _digits_net_and_batches()
    nets = {}
    for mode in ("centroids", "weights"):
        net = MLP(64, (48,), 10)
        net.load_state_dict(trained.state_dict())
        floats = {n: p.detach().clone() for n, p in net.named_parameters()}
        shared = quantize_model(net, bits_fc=2, quality=0.5)  # 3 shared values + the pruned zeros
        quantized_loss = _mean_loss(net, batches)
        if mode == "centroids":
            out = finetune_centroids(net, shared, batches, epochs=3, lr=1e-3)
        else:
            out = finetune_weights(net, shared, batches, epochs=3, lr=1e-3, init=floats)
        for name, sw in out.items():
            w = net.get_parameter(name).detach()
            assert torch.equal(w, sw.codebook[sw.labels]) and sw.codebook[0] == 0
            assert sw.codebook.numel() == shared[name].codebook.numel() == 4
            assert torch.equal(sw.labels == 0, shared[name].labels == 0)  # the same weights pruned, still zero
            assert torch.unique(w[w != 0]).numel() <= 3
        assert _mean_loss(net, batches) < quantized_loss
        nets[mode] = _mean_loss(net, batches)
    assert nets["weights"] < nets["centroids"]


def test_deep_compress_with_weight_finetuning_writes_a_file_that_decodes_to_the_tuned_network(tmp_path: Path) -> None:
    net, batches = _digits_net_and_batches()
    result = deep_compress(net, tmp_path / "m.dstl", bits_fc=3, finetune_loader=batches, finetune_epochs=1,
                           finetune_lr=1e-4, finetune="weights", test_loader=batches)  # fmt: skip
    decoded = load_compressed(tmp_path / "m.dstl")
    for k, v in net.state_dict().items():
        assert torch.equal(decoded.state_dict()[k], v)
    assert result["accuracy"]["decoded"] == result["accuracy"]["quantized"] > 0.8
    with pytest.raises(ValueError, match="finetune must be one of"):
        deep_compress(net, tmp_path / "n.dstl", finetune="all")


def test_prune_quantize_passes_weight_finetuning_on(trainer_kwargs: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import distill.compress.pipeline as pipeline

    calls: list[int] = []
    real = pipeline.finetune_weights
    monkeypatch.setattr(pipeline, "finetune_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    pq = PruneQuantize(bits_fc=3, finetune_epochs=1, finetune_batches=2, finetune="weights")
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 2}, callbacks=[pq])
    trainer.fit(PlainDigits(), datamodule=DigitsDataModule(batch_size=64))
    assert calls == [1] and (tmp_path / "model.dstl").is_file()


@pytest.fixture
def digits_checkpoint(trainer_kwargs: dict[str, Any], tmp_path: Path) -> Path:
    from distill.modules import Classifier

    module = Classifier(MLP(64, (32,), 10))
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 3})
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_compress_and_evaluate_commands(digits_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "m.dstl"
    assert compress_main([str(tmp_path / "run"), "--out", str(out), "--quality", "0.5", "--data", "digits"]) == 0
    printed = capsys.readouterr().out
    assert "compression:" in printed and "% read back from the file" in printed
    assert (tmp_path / "out" / "compression_report.md").is_file()
    assert evaluate_main([str(out), "--data", "digits"]) == 0
    acc_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test accuracy")][0]
    decoded = json.loads((tmp_path / "out" / "accuracy.json").read_text())["decoded"]
    assert f"{100 * decoded:.2f}%" in acc_line
    half = tmp_path / "half" / "m.dstl"
    assert compress_main([str(tmp_path / "run"), "--out", str(half), "--quality", "0.5", "--raw-dtype", "float16"]) == 0
    encodings = {r["name"]: r["encoding"] for r in read_header(half)["tensors"]}
    assert encodings["fc1.bias"] in ("raw-f16", "raw-sparse") and read_header(half)["meta"]["raw_dtype"] == "float16"


def test_commands_reject_a_data_set_the_model_was_not_trained_on(
    digits_checkpoint: Path, tmp_path: Path, mnist_root: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out" / "m.dstl"
    assert compress_main([str(tmp_path / "run"), "--out", str(out), "--quality", "0.5"]) == 0
    capsys.readouterr()
    wrong = ["--data", "mnist", "--data-dir", str(mnist_root)]
    assert evaluate_main([str(out), *wrong]) == 2
    err = capsys.readouterr().err
    assert "does not take --data mnist's inputs (batches of shape (1, 28, 28))" in err and "Fix: give --data" in err
    assert compress_main([str(tmp_path / "run"), "--out", str(tmp_path / "m2.dstl"), *wrong]) == 2
    assert "does not take --data mnist's inputs" in capsys.readouterr().err
    assert not (tmp_path / "m2.dstl").exists()  # checked before anything is written


def test_commands_reject_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compress_main([str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "m.dstl")]) == 2
    assert "checkpoint or run folder not found" in capsys.readouterr().err
    assert compress_main([str(tmp_path), "--out", str(tmp_path / "m.dstl")]) == 2
    assert "no last.ckpt under run folder" in capsys.readouterr().err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert compress_main([str(junk), "--out", str(tmp_path / "m.dstl")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert evaluate_main([str(junk), "--data", "digits"]) == 2
    assert "not a distill compressed file" in capsys.readouterr().err
    assert evaluate_main([str(tmp_path / "missing.dstl"), "--data", "digits"]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_compression_callback_picks_the_same_network() -> None:
    """One rule (``network_of``): the student, else ``model``, else the module; adapters and teachers never."""
    from distill.callbacks import FigureLogger
    from distill.compress.params import network_of

    class WithAdapters(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.student = MLP(64, (16,), 10)
            self.adapters = nn.ModuleList([nn.Linear(16, 32)])
            self.model = MLP(64, (8,), 10)  # a second network: the student wins

    module = WithAdapters()
    assert network_of(module) == (module.student, "student.")
    expected = {"student.fc1.weight", "student.fc2.weight"}
    assert set(GMMPrior().filter_parameters(module)) == expected
    assert set(MagnitudePruning(quality=1.0).filter_parameters(module)) == expected
    assert PruneQuantize().network(module) is module.student
    assert set(FigureLogger().filter_parameters(module)) == {"fc1.weight", "fc2.weight"}
    assert PruneQuantize(module_attr="model").network(module) is module.model
    plain = PlainDigits()
    assert network_of(plain) == (plain.model, "model.")
    bare = nn.Sequential(nn.Linear(4, 2))
    assert network_of(bare) == (bare, "")
    with pytest.raises(ValueError, match="module_attr='head' is not an nn.Module"):
        network_of(module, "head")
