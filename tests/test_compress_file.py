"""The compressed file: exact round trips, rejection of bad files, the size report and the entropy-bound check."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill.compress import (
    CompressedFileError,
    compression_report,
    decode_into,
    load_compressed,
    load_compressed_state_dict,
    quantize_model,
    read_header,
    report_markdown,
    save_compressed,
    write_report,
)
from distill.compress.fileformat import FORMAT_VERSION, MAGIC
from distill.compress.report import TensorStats, build_report
from models import MLP, VGG19BN, LeNet5Caffe, LeNet300100, MNISTConvNet, SmallConvNet

MODELS = [
    lambda: MLP(64, (32, 16), 10),
    LeNet300100,
    LeNet5Caffe,
    MNISTConvNet,
    SmallConvNet,
    lambda: VGG19BN(width=0.0625),
]


@pytest.mark.parametrize(
    "make", MODELS, ids=["MLP", "LeNet300100", "LeNet5Caffe", "MNISTConvNet", "SmallConvNet", "VGG19BN"]
)
def test_round_trip_is_exact(make, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # non-trivial BN statistics and biases must survive too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked += 7
        if isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None:
            m.bias.data.normal_()
    quantize_model(model, bits_conv=8, bits_fc=5, quality=0.8)
    model.eval()
    header = save_compressed(model, tmp_path / "m.dstl")
    loaded = load_compressed(tmp_path / "m.dstl")
    assert type(loaded) is type(model) and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(3, *model.input_shape)
    assert torch.equal(loaded(x), model(x))
    assert header["file_bytes"] == (tmp_path / "m.dstl").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.dstl"]  # no temp file left behind
    target = make()
    decode_into(target, tmp_path / "m.dstl")
    assert torch.equal(target.eval()(x), model(x))


def test_unquantized_weight_is_stored_raw_and_exact(tmp_path: Path) -> None:
    model = MLP(8, (4,), 3)
    save_compressed(model, tmp_path / "m.dstl")
    header = read_header(tmp_path / "m.dstl")
    enc = {r["name"]: r["encoding"] for r in header["tensors"]}
    assert enc["fc1.weight"] == enc["fc2.weight"] == "raw"  # codebook coding would not be smaller
    assert enc["fc1.bias"] == "raw-sparse"  # all zeros: the bitmap alone
    assert torch.equal(load_compressed(tmp_path / "m.dstl").fc1.weight, model.fc1.weight)


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = LeNet5Caffe()
    quantize_model(model, quality=1.0)
    path = tmp_path / "good.dstl"
    save_compressed(model, path)
    return path


def test_truncated_file_rejected(good_file: Path, tmp_path: Path) -> None:
    blob = good_file.read_bytes()
    for cut in (len(blob) - 1, len(blob) // 2, 40, 10):
        bad = tmp_path / f"cut{cut}.dstl"
        bad.write_bytes(blob[:cut])
        with pytest.raises(CompressedFileError, match="truncated"):
            load_compressed(bad)


def test_corrupted_file_rejected(good_file: Path, tmp_path: Path) -> None:
    blob = bytearray(good_file.read_bytes())
    for at in (20, len(blob) // 2, len(blob) - 10, len(blob) - 1):
        bad_blob = bytearray(blob)
        bad_blob[at] ^= 0x10
        bad = tmp_path / "bad.dstl"
        bad.write_bytes(bytes(bad_blob))
        with pytest.raises(CompressedFileError, match="corrupted"):
            load_compressed(bad)


def test_foreign_and_unknown_version_rejected(good_file: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, foreign)
    with pytest.raises(CompressedFileError, match="not a distill compressed file"):
        load_compressed(foreign)
    empty = tmp_path / "empty.dstl"
    empty.write_bytes(b"")
    with pytest.raises(CompressedFileError, match="not a distill compressed file"):
        load_compressed(empty)
    blob = bytearray(good_file.read_bytes())
    struct.pack_into("<H", blob, len(MAGIC), FORMAT_VERSION + 1)
    newer = tmp_path / "newer.dstl"
    newer.write_bytes(bytes(blob))
    with pytest.raises(CompressedFileError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        load_compressed(newer)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_compressed(tmp_path / "missing.dstl")


def test_header_is_zlib_compressed_json_with_architecture(good_file: Path) -> None:
    blob = good_file.read_bytes()
    (version,) = struct.unpack_from("<H", blob, 8)
    (hlen,) = struct.unpack_from("<I", blob, 10)
    assert version == FORMAT_VERSION == 3
    header = json.loads(zlib.decompress(blob[14 : 14 + hlen]))
    assert header["arch"] == {"class_path": "models.lenet.LeNet5Caffe", "init_args": {"num_classes": 10}}
    assert header["tensors"][0]["name"] == "conv1.weight"


def test_version_1_files_still_read_exactly_and_version_2_is_smaller(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = LeNet5Caffe()
    quantize_model(model, bits_conv=4, bits_fc=3, sparsity=0.97)
    with torch.no_grad():  # a float16-exact codebook in one layer, so that both codebook widths are exercised
        w = model.fc2.weight
        w.copy_(w.half().float())
    old = save_compressed(model, tmp_path / "v1.dstl", version=1)
    new = save_compressed(model, tmp_path / "v2.dstl", version=2)
    blob = (tmp_path / "v1.dstl").read_bytes()
    assert struct.unpack_from("<H", blob, 8)[0] == 1
    assert json.loads(blob[14 : 14 + old["header_bytes"]])["tensors"][0]["name"] == "conv1.weight"
    recs = {r["name"]: r for r in new["tensors"]}
    assert recs["fc2.weight"]["codebook_dtype"] == "float16" and recs["fc1.weight"]["codebook_dtype"] == "float32"
    assert new["file_bytes"] < old["file_bytes"] and new["header_bytes"] < old["header_bytes"] / 2
    for name in ("v1.dstl", "v2.dstl"):
        state, _ = load_compressed_state_dict(tmp_path / name)
        for k, v in model.state_dict().items():
            assert torch.equal(state[k], v), (name, k)
    with pytest.raises(ValueError, match="version must be one of"):
        save_compressed(model, tmp_path / "v4.dstl", version=4)


def test_version_3_stores_float16_exact_raw_tensors_in_half_the_bytes(tmp_path: Path) -> None:
    from distill.compress.pipeline import round_raw_tensors

    torch.manual_seed(4)
    model = VGG19BN(width=0.0625)
    quantize_model(model, bits_conv=4, bits_fc=4, sparsity=0.9)
    with torch.no_grad():
        model.classifier[-1].bias.fill_(1e6)  # beyond float16's range: must stay float32
    rounded = round_raw_tensors(model, keep=[n for n, _ in model.named_parameters() if n.endswith("weight")
                                              and model.get_parameter(n).dim() > 1])
    assert "classifier.6.bias" not in rounded and "features.1.running_var" in rounded
    assert not any(n.endswith("num_batches_tracked") for n in rounded)  # int64 buffers untouched
    v2 = save_compressed(model, tmp_path / "v2.dstl", version=2)
    v3 = save_compressed(model, tmp_path / "v3.dstl")
    enc3 = {r["name"]: (r["encoding"], r["length"]) for r in v3["tensors"]}
    enc2 = {r["name"]: (r["encoding"], r["length"]) for r in v2["tensors"]}
    assert enc3["features.1.running_var"] == ("raw-f16", enc2["features.1.running_var"][1] // 2)
    assert enc3["classifier.6.bias"][0] == "raw" and enc3["features.0.weight"][0] == "huffman-sparse"
    # a shared weight's record carries no field of the raw record it beat (the sparse raw one has value_dtype)
    assert not any("value_dtype" in r for r in v3["tensors"] if r["encoding"] == "huffman-sparse")
    assert v3["file_bytes"] < v2["file_bytes"]
    for name in ("v2.dstl", "v3.dstl"):
        state, _ = load_compressed_state_dict(tmp_path / name)
        for k, v in model.state_dict().items():
            assert torch.equal(state[k], v) and state[k].dtype == v.dtype, (name, k)
    # a float16 record whose byte count does not match its shape is rejected, not misread
    blob = bytearray((tmp_path / "v3.dstl").read_bytes())
    hlen = struct.unpack_from("<I", blob, 10)[0]
    header = json.loads(zlib.decompress(blob[14 : 14 + hlen]))
    rec = next(r for r in header["tensors"] if r["encoding"] == "raw-f16")
    rec["shape"] = [rec["shape"][0] + 1]
    hb = zlib.compress(json.dumps(header).encode())
    body = bytes(blob[:10]) + struct.pack("<I", len(hb)) + hb + bytes(blob[14 + hlen : -4])
    (tmp_path / "bad.dstl").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(CompressedFileError, match="float16 tensor holds"):
        load_compressed_state_dict(tmp_path / "bad.dstl")


def test_bits_per_weight_within_five_percent_of_entropy_bound(tmp_path: Path) -> None:
    """A realistic layer (LeNet-300-100's fc1: 235k weights, ~92% pruned, 5-bit k-means of Laplace-like weights)."""
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.05).sample((300, 784))
    w[w.abs() < 0.125] = 0  # ~92% zeros
    model = nn.Sequential(nn.Linear(784, 300))
    with torch.no_grad():
        model[0].weight.copy_(w)
    quantize_model(model, bits_fc=5)
    save_compressed(model, tmp_path / "m.dstl", arch={"class_path": "torch.nn.Linear", "init_args": {}})
    report = compression_report(tmp_path / "m.dstl")
    (layer,) = report["layers"]
    rec = read_header(tmp_path / "m.dstl")["tensors"][0]
    stored_bits = 8 * layer["bytes"]  # streams + tables + codebook, as written
    codebook_bits = 32 * rec["codebook"]
    flat = model[0].weight.detach().flatten().numpy()
    positions = np.flatnonzero(flat)
    from distill.compress.huffman import entropy_bits
    from distill.compress.sparse import stream_counts

    codes = np.searchsorted(np.unique(flat[positions]), flat[positions]) + 1
    gc, cc = stream_counts(positions, codes, rec["index_bits"])
    bound = entropy_bits(gc) + entropy_bits(cc) + codebook_bits
    assert 1.0 <= stored_bits / bound < 1.05
    assert 0.9 < layer["sparsity"] < 0.94


def test_report_arithmetic_on_hand_made_case() -> None:
    stats = [
        TensorStats("fc1.weight", (10, 10), True, True, nonzero=20, record_bytes=30, entries=24, codebook=3,
                    index_bits=3, code_bits=40, gap_bits=60, stream_bytes=15, code_entropy_bits=36.0,
                    gap_entropy_bits=52.0),
        TensorStats("fc1.bias", (10,), True, False, nonzero=9, record_bytes=40),
        TensorStats("bn.running_mean", (5,), False, False, nonzero=5, record_bytes=20),
    ]  # fmt: skip
    r = build_report(stats, file_bytes=200)
    (row,) = r["layers"]
    assert row["params"] == 100 and row["nonzero"] == 20 and row["sparsity"] == pytest.approx(0.8)
    assert row["bits_per_weight"] == pytest.approx(40 / 20) and row["bits_per_index"] == pytest.approx(60 / 20)
    t = r["totals"]
    assert t["total_params"] == 110  # buffers are not parameters
    assert t["total_weights"] == 100 and t["zero_weights"] == 80 and t["zero_rate"] == pytest.approx(0.8)
    assert t["nonzero_fraction"] == pytest.approx(0.2)
    assert t["dense_bytes"] == 440 and t["compression_rate"] == pytest.approx(440 / 200)
    # fixed width: 24 entries x (3 index + ceil(log2 4) = 2 code bits) = 120 bits = 15 bytes, replacing 15 coded bytes
    assert t["analytic_bytes"] == 200 - 15 + 15
    assert t["entropy_bound_bytes"] == pytest.approx(200 - 15 + (36 + 52) / 8)
    assert r["uncompressed"] == {"tensors": 2, "params": 10, "bytes": 60, "values": 15}
    assert "| fc1.weight | 10x10 | 100 | 20 | 80.00% | 2.00 | 3.00 | 30 |" in report_markdown(r)


def test_report_of_a_real_file_is_consistent(good_file: Path, tmp_path: Path) -> None:
    r = compression_report(good_file)
    t = r["totals"]
    assert t["file_bytes"] == good_file.stat().st_size
    assert t["total_params"] == 431_080 and t["dense_bytes"] == 4 * 431_080
    assert t["entropy_bound_bytes"] <= t["file_bytes"] < t["analytic_bytes"]
    assert sum(row["bytes"] for row in r["layers"]) + r["uncompressed"]["bytes"] < t["file_bytes"]
    assert math.isclose(t["compression_rate"], t["dense_bytes"] / t["file_bytes"])
    paths = write_report(r, tmp_path / "rep")
    assert json.loads(paths["json"].read_text())["totals"] == t
    assert "compression rate" in paths["md"].read_text()
