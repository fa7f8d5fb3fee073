"""Tests of kanvolution.experiments.data: file lookup, strict IDX parsing, downloads (faked), batching, splits."""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from kanvolution.experiments import data

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the user's cache or environment, and none reaches the network."""
    monkeypatch.delenv("KANVOLUTION_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    code = {np.dtype("u1"): 0x08, np.dtype("i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def tiny_split(folder: Path, n_images: int = 3, n_labels: int = 3) -> None:
    write_idx(folder / "t10k-images-idx3-ubyte", np.arange(n_images * 784, dtype=np.uint8).reshape(n_images, 28, 28))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_labels, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Loading the real files


@pytest.mark.parametrize("name", data.DATASETS)
@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_load_dataset_shapes_dtypes_ranges(shared_data_dir, name, split, n):
    images, labels = data.load_dataset(name, split, data_dir=shared_data_dir, download=False)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.min() == 0 and labels.max() == 9
    assert torch.isfinite(images).all()


def test_fashion_train_is_balanced(shared_data_dir):
    _, labels = data.load_dataset("fashion-mnist", "train", data_dir=shared_data_dir, download=False)
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10


def test_normalisation_matches_the_paper(shared_data_dir):
    raw, raw_labels = data.load_raw("fashion-mnist", "test", data_dir=shared_data_dir, download=False)
    images, labels = data.load_dataset("fashion-mnist", "test", data_dir=shared_data_dir, download=False)
    assert raw.dtype == torch.uint8 and raw.shape == images.shape
    # ToTensor() then Normalize((0.5,), (0.5,)), op by op as torchvision does it.
    expected = raw.to(torch.float32).div(255).sub_(torch.tensor(0.5)).div_(torch.tensor(0.5))
    assert torch.equal(images, expected)
    assert torch.equal(labels, raw_labels)


def test_returned_tensors_are_private_copies(shared_data_dir):
    first, labels = data.load_raw("mnist", "test", data_dir=shared_data_dir, download=False)
    first.zero_()
    labels.zero_()
    again, labels_again = data.load_raw("mnist", "test", data_dir=shared_data_dir, download=False)
    assert again.any() and labels_again.any()


def test_bad_names_list_the_valid_ones(shared_data_dir):
    with pytest.raises(ValueError, match="'mnist', 'fashion-mnist'"):
        data.load_dataset("cifar10", "train", data_dir=shared_data_dir)
    with pytest.raises(ValueError, match="'train', 'test'"):
        data.load_dataset("mnist", "val", data_dir=shared_data_dir)


# ---------------------------------------------------------------------------------------------
# Where files are looked for


def test_torchvision_raw_layout_gzipped_and_not(shared_data_dir, tmp_path):
    expected = data.load_raw("fashion-mnist", "test", data_dir=shared_data_dir, download=False)
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in STEMS[2:]:
        (raw / f"{stem}.gz").symlink_to(shared_data_dir / "fashion-mnist" / f"{stem}.gz")
    got = data.load_raw("fashion-mnist", "test", data_dir=tmp_path / "tv", download=False)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    plain = tmp_path / "plain" / "FashionMNIST" / "raw"
    plain.mkdir(parents=True)
    for stem in STEMS[2:]:
        (plain / stem).write_bytes(gzip.decompress((shared_data_dir / "fashion-mnist" / f"{stem}.gz").read_bytes()))
    got = data.load_raw("fashion-mnist", "test", data_dir=tmp_path / "plain", download=False)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_mnist_and_fashion_do_not_mix_in_one_root(shared_data_dir):
    mnist, _ = data.load_raw("mnist", "test", data_dir=shared_data_dir, download=False)
    fashion, _ = data.load_raw("fashion-mnist", "test", data_dir=shared_data_dir, download=False)
    assert not torch.equal(mnist, fashion)


def test_environment_variable_is_searched(shared_data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("KANVOLUTION_DATA", str(shared_data_dir))
    images, _ = data.load_dataset("mnist", "test", download=False)
    assert images.shape == (10_000, 1, 28, 28)
    assert data.search_dirs(tmp_path) == [tmp_path, shared_data_dir, tmp_path / "xdg-cache" / "kanvolution"]


def test_data_dir_comes_before_the_environment(monkeypatch, tmp_path):
    # Tiny files are refused by name, which shows the folder each call read.
    tiny_split(tmp_path / "explicit" / "mnist")
    tiny_split(tmp_path / "env" / "mnist")
    monkeypatch.setenv("KANVOLUTION_DATA", str(tmp_path / "env"))
    with pytest.raises(data.CorruptDatasetError, match=str(tmp_path / "env")):
        data.load_raw("mnist", "test", download=False)
    with pytest.raises(data.CorruptDatasetError, match=str(tmp_path / "explicit")):
        data.load_raw("mnist", "test", data_dir=tmp_path / "explicit", download=False)


def test_cache_dir_follows_xdg(tmp_path):
    assert data.default_cache_dir() == tmp_path / "xdg-cache" / "kanvolution"


# ---------------------------------------------------------------------------------------------
# Strict parsing


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    for compress in (False, True):
        got = data.read_idx(write_idx(tmp_path / f"a{compress}", array, compress=compress))
        assert got.dtype == np.int32 and got.dtype.isnative and np.array_equal(got, array)


def test_truncated_gzip_names_the_file(shared_data_dir, tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    shutil.copy(shared_data_dir / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz", folder)
    blob = (shared_data_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.CorruptDatasetError, match="t10k-images-idx3-ubyte.gz") as info:
        data.load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    assert str(bad) in str(info.value) and "gzip" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_magic_names_the_file(tmp_path):
    folder = tmp_path / "mnist"
    tiny_split(folder)
    path = folder / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[2] = 0x07  # not an IDX dtype code
    path.write_bytes(bytes(blob))
    with pytest.raises(data.CorruptDatasetError, match="magic") as info:
        data.load_raw("mnist", "test", data_dir=tmp_path, download=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("cut", [1, 3, 10])
def test_short_or_long_data_is_rejected(tmp_path, cut):
    path = write_idx(tmp_path / "x", np.zeros((2, 28, 28), np.uint8))
    blob = path.read_bytes()
    path.write_bytes(blob[:-cut])
    with pytest.raises(data.CorruptDatasetError, match="data bytes"):
        data.read_idx(path)
    path.write_bytes(blob + b"\0" * cut)
    with pytest.raises(data.CorruptDatasetError, match="data bytes"):
        data.read_idx(path)
    path.write_bytes(blob[:3])
    with pytest.raises(data.CorruptDatasetError, match="too short"):
        data.read_idx(path)


def test_image_and_label_counts_must_agree(tmp_path):
    tiny_split(tmp_path / "mnist", n_images=3, n_labels=2)
    with pytest.raises(data.CorruptDatasetError, match="3 images but .* 2 labels"):
        data.load_raw("mnist", "test", data_dir=tmp_path, download=False)


def test_wrong_image_shape_and_label_values(tmp_path):
    folder = tmp_path / "mnist"
    tiny_split(folder)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(data.CorruptDatasetError, match=r"\(N, 28, 28\)"):
        data.load_raw("mnist", "test", data_dir=tmp_path, download=False)
    tiny_split(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.array([0, 1, 10], np.uint8))
    with pytest.raises(data.CorruptDatasetError, match="label 10"):
        data.load_raw("mnist", "test", data_dir=tmp_path, download=False)


def _copy_split(shared_data_dir, folder, split="test", order=None):
    """The shared files of one split written to ``folder`` (decompressed), their rows reordered by ``order``."""
    images, labels = data.load_raw("fashion-mnist", split, data_dir=shared_data_dir, download=False)
    if order is not None:
        images, labels = images[order], labels[order]
    prefix = "t10k" if split == "test" else "train"
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images.squeeze(1).numpy())
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8).numpy())


def test_replaced_file_is_read_again(shared_data_dir, tmp_path):
    folder = tmp_path / "fashion-mnist"
    _copy_split(shared_data_dir, folder)
    first = data.load_raw("fashion-mnist", "test", data_dir=tmp_path, download=False)[1]
    _copy_split(shared_data_dir, folder, order=torch.arange(10_000).flip(0))
    again = data.load_raw("fashion-mnist", "test", data_dir=tmp_path, download=False)[1]
    assert torch.equal(again, first.flip(0))


# ---------------------------------------------------------------------------------------------
# Verification of the contents: honest copies pass, other files are refused


def test_an_honest_reordered_copy_is_accepted(shared_data_dir, tmp_path):
    # Not byte-identical to any known file (rows reordered, not gzipped): its checks still pass.
    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(1))
    _copy_split(shared_data_dir, tmp_path / "fashion-mnist", order=order)
    images, labels = data.load_raw("fashion-mnist", "test", data_dir=tmp_path, download=False)
    assert images.shape == (10_000, 1, 28, 28) and torch.bincount(labels).tolist() == [1000] * 10


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_labels_in_the_fashion_folder_are_refused(shared_data_dir, tmp_path, split):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    prefix = "t10k" if split == "test" else "train"
    for kind in ("images-idx3", "labels-idx1"):
        source = "mnist" if kind.startswith("labels") else "fashion-mnist"
        shutil.copy(shared_data_dir / source / f"{prefix}-{kind}-ubyte.gz", folder)
    with pytest.raises(data.CorruptDatasetError, match=f"holds MNIST's {prefix}-labels-idx1-ubyte, not Fashion-MNIST's"):
        data.load_raw("fashion-mnist", split, data_dir=tmp_path, download=False)


def test_unknown_labels_of_the_wrong_balance_are_refused(shared_data_dir, tmp_path):
    # MNIST's test labels, re-ordered so that no checksum knows them: the class balance gives them away.
    labels = data.load_raw("mnist", "test", data_dir=shared_data_dir, download=False)[1].flip(0)
    folder = tmp_path / "fashion-mnist"
    _copy_split(shared_data_dir, folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels.to(torch.uint8).numpy())
    with pytest.raises(data.CorruptDatasetError, match="not Fashion-MNIST's .exactly 10% each"):
        data.load_raw("fashion-mnist", "test", data_dir=tmp_path, download=False)


def test_a_split_of_the_wrong_size_is_refused(tmp_path):
    tiny_split(tmp_path / "mnist")
    with pytest.raises(data.CorruptDatasetError, match="has 10000 images, this file 3"):
        data.load_raw("mnist", "test", data_dir=tmp_path, download=False)


def test_test_files_in_place_of_the_training_files_are_refused(shared_data_dir, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copy(shared_data_dir / "mnist" / f"t10k-{kind}-ubyte.gz", folder / f"train-{kind}-ubyte.gz")
    with pytest.raises(data.CorruptDatasetError, match="holds MNIST's t10k-images-idx3-ubyte, not MNIST's train-images"):
        data.load_raw("mnist", "train", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------------------------------------
# Missing files and downloads (the network is faked)


def test_missing_files_offline_say_what_and_where(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine", download=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    for folder in (tmp_path / "mine" / "fashion-mnist", tmp_path / "mine" / "FashionMNIST" / "raw",
                   tmp_path / "xdg-cache" / "kanvolution" / "fashion-mnist"):
        assert str(folder) in message
    assert "KANVOLUTION_DATA" in message


def test_only_the_missing_file_is_named(tmp_path):
    tiny_split(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="missing t10k-labels-idx1-ubyte") as info:
        data.load_raw("mnist", "test", data_dir=tmp_path, download=False)
    assert "t10k-images" not in str(info.value).splitlines()[0]


def test_failed_download_is_reported_and_leaves_nothing(monkeypatch, tmp_path):
    calls = []

    def offline(url, dest, *, md5, progress=True):
        calls.append((url, dest, md5))
        raise OSError("no route to host")

    monkeypatch.setattr(data, "_download_url", offline)
    with pytest.raises(data.DatasetNotFoundError, match="no route to host"):
        data.load_dataset("mnist", "test")
    url, dest, md5 = calls[0]
    assert url == "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz"
    assert dest == tmp_path / "xdg-cache" / "kanvolution" / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert md5 == "9fb629c4189551a2d022fa330f9573f3"
    assert not dest.exists()


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def fake_site(monkeypatch, folder: Path) -> list[str]:
    """Serve the files of ``folder`` as if from the official site; return the URLs asked for."""
    urls: list[str] = []

    def urlopen(url, timeout=None):
        urls.append(url)
        return FakeResponse((folder / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return urls


def test_download_verifies_md5_and_writes_atomically(shared_data_dir, monkeypatch, tmp_path):
    source = shared_data_dir / "fashion-mnist"
    urls = fake_site(monkeypatch, source)
    # The shared copies are reshuffled, so they fail the official checksums: nothing is kept.
    with pytest.raises(data.CorruptDatasetError, match="MD5"):
        data.load_dataset("fashion-mnist", "test", data_dir=tmp_path / "dl")
    assert urls[0].startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
    assert list((tmp_path / "dl" / "fashion-mnist").iterdir()) == []

    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.glob("*.gz")}
    monkeypatch.setitem(data._MD5, "fashion-mnist", sums)
    images, labels = data.load_dataset("fashion-mnist", "test", data_dir=tmp_path / "dl")
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    assert sorted(p.name for p in (tmp_path / "dl" / "fashion-mnist").iterdir()) == sorted(
        f"{stem}.gz" for stem in STEMS[2:]
    )
    urls.clear()
    data.load_dataset("fashion-mnist", "test", data_dir=tmp_path / "dl")
    assert urls == []  # found on disk now


# ---------------------------------------------------------------------------------------------
# Batching and splitting


@pytest.mark.parametrize("n, batch_size, drop_last", [(10, 3, False), (10, 3, True), (12, 4, False), (5, 8, False)])
def test_batches_cover_every_sample_once(n, batch_size, drop_last):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    labels = torch.arange(n)
    for shuffle in (False, True):
        batches = list(data.iterate_batches(images, labels, batch_size, shuffle=shuffle, drop_last=drop_last))
        assert len(batches) == data.num_batches(n, batch_size, drop_last)
        seen = torch.cat([y for _, y in batches])
        for x, y in batches:
            assert torch.equal(x[:, 0, 0, 0].long(), y)  # images stay with their labels
            assert len(y) == batch_size or (not drop_last and y is batches[-1][1])
        if drop_last:
            assert len(seen) == n - n % batch_size and len(set(seen.tolist())) == len(seen)
        else:
            assert sorted(seen.tolist()) == list(range(n))
        if not shuffle:
            assert seen.tolist() == list(range(len(seen)))


def test_shuffle_is_reproducible_with_a_generator():
    images, labels = torch.zeros(100, 1, 28, 28), torch.arange(100)

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in data.iterate_batches(images, labels, 32, shuffle=True, generator=g)])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert not torch.equal(order(0), labels)
    g = torch.Generator().manual_seed(0)  # one generator: successive epochs differ
    epochs = [torch.cat([y for _, y in data.iterate_batches(images, labels, 32, shuffle=True, generator=g)])
              for _ in range(2)]
    assert not torch.equal(*epochs)


def test_batching_rejects_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        data.iterate_batches(torch.zeros(3, 1), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="batch_size"):
        data.iterate_batches(torch.zeros(3, 1), torch.zeros(3), 0)


@pytest.mark.parametrize(
    "n, val_fraction, seed", [(60_000, 0.2, 0), (10, 0.2, 0), (7, 0.2, 3), (101, 0.33, 5), (3, 0.5, 1)]
)
def test_train_val_split_equals_random_split(n, val_fraction, seed):
    train_idx, val_idx = data.train_val_split(n, val_fraction, seed)
    expected = torch.utils.data.random_split(
        range(n), [1 - val_fraction, val_fraction], generator=torch.Generator().manual_seed(seed)
    )
    assert train_idx.dtype == val_idx.dtype == torch.int64
    assert train_idx.tolist() == expected[0].indices
    assert val_idx.tolist() == expected[1].indices


def test_paper_split_sizes():
    train_idx, val_idx = data.train_val_split(60_000)
    assert len(train_idx) == 48_000 and len(val_idx) == 12_000
    with pytest.raises(ValueError, match="val_fraction"):
        data.train_val_split(10, 1.0)
