"""MNIST and Fashion-MNIST as tensors: find or download the IDX files, parse them strictly,
normalise them as the paper does, and batch them by tensor indexing (no DataLoader needed)."""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import KanvolutionError
from .files import atomic_write

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "default_cache_dir",
    "search_dirs",
    "download_dataset",
    "read_idx",
    "load_raw",
    "load_dataset",
    "normalize",
    "iterate_batches",
    "num_batches",
    "train_val_split",
    "augment_batch",
]

DatasetName = Literal["mnist", "fashion-mnist"]
Split = Literal["train", "test"]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")
SPLITS: tuple[str, ...] = ("train", "test")

_FILES: dict[str, tuple[str, str]] = {  # split -> (images, labels), without ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MIRRORS = {  # tried in order
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
# MD5 sums of the official gzipped files, as published by torchvision.
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
# SHA-256 of the decompressed contents of known honest copies that differ from the official
# gzipped files (whose MD5 sums are above): the copies this project's test machines hold.
_KNOWN_SHA256: dict[tuple[str, str], frozenset[str]] = {
    ("mnist", "train-images-idx3-ubyte"): frozenset({"ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"}),
    ("mnist", "train-labels-idx1-ubyte"): frozenset({"65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"}),
    ("mnist", "t10k-images-idx3-ubyte"): frozenset({"0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"}),
    ("mnist", "t10k-labels-idx1-ubyte"): frozenset({"ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"}),
    ("fashion-mnist", "train-images-idx3-ubyte"): frozenset(
        {"78af20091c5d087c418fa52c91e53862a972bd443e63fb11d2e786b92808aa16"}
    ),
    ("fashion-mnist", "train-labels-idx1-ubyte"): frozenset(
        {"7cd88f551e93510030f93325e39e5d8112c932e2d6d2b1fde7ead816545ae184"}
    ),
    ("fashion-mnist", "t10k-images-idx3-ubyte"): frozenset(
        {"30270969a8ba48240e771468112d9ad6bcf9f164314c3a6bb60964d10f48e351"}
    ),
    ("fashion-mnist", "t10k-labels-idx1-ubyte"): frozenset(
        {"59df6c6ad638dc43879f10a8c5b516aabdcef4f924ba14410bf8aec5e518b1c4"}
    ),
}
_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_SPLIT_SIZE = {"train": 60_000, "test": 10_000}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_SIZE = (28, 28)
_NUM_CLASSES = 10


class DatasetNotFoundError(KanvolutionError, RuntimeError):
    """The IDX files of a dataset split are in none of the searched folders."""


class CorruptDatasetError(KanvolutionError, ValueError):
    """A dataset file exists but is not a valid IDX file of the expected shape."""


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {', '.join(map(repr, DATASETS))}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, SPLITS))}")


def default_cache_dir() -> Path:
    """The per-user folder that downloads go to when nothing else is configured.

    ``$XDG_CACHE_HOME/kanvolution`` if ``XDG_CACHE_HOME`` is set, else ``~/.cache/kanvolution``.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kanvolution"


def search_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The root folders searched for dataset files, in order.

    Args:
        data_dir: an explicit folder, searched first.

    Returns:
        ``data_dir`` (if given), then ``$KANVOLUTION_DATA`` (if set), then
        :func:`default_cache_dir`, without duplicates. Inside each root a dataset is looked for
        as ``ROOT/<name>/<file>`` (e.g. ``ROOT/fashion-mnist/``) and in torchvision's layout
        ``ROOT/FashionMNIST/raw/<file>`` / ``ROOT/MNIST/raw/<file>``.

    Examples:
        >>> search_dirs("/data")[0]
        PosixPath('/data')
    """
    candidates = [data_dir, os.environ.get("KANVOLUTION_DATA") or None, default_cache_dir()]
    roots: list[Path] = []
    for candidate in candidates:
        if candidate is not None:
            root = Path(candidate).expanduser()
            if root not in roots:
                roots.append(root)
    return roots


def _folders(name: str, roots: list[Path]) -> list[Path]:
    return [folder for root in roots for folder in (root / name, root / _TORCHVISION_FOLDER[name] / "raw")]


def _find(folder: Path, stem: str) -> Path | None:
    # Prefer the uncompressed file: torchvision keeps both, and it reads faster.
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _locate(name: str, split: str, roots: list[Path]) -> tuple[Path, Path] | None:
    """The (images, labels) files of one split, both from the same folder, or None."""
    for folder in _folders(name, roots):
        images, labels = (_find(folder, stem) for stem in _FILES[split])
        if images is not None and labels is not None:
            return images, labels
    return None


def _not_found(name: str, split: str, roots: list[Path], reason: str | None) -> DatasetNotFoundError:
    folders = _folders(name, roots)
    missing = [stem for stem in _FILES[split] if not any(_find(f, stem) for f in folders)]
    missing = missing or list(_FILES[split])  # both exist, but not side by side
    lines = [
        f"{name}, split {split!r}: not found, missing {', '.join(f'{m}[.gz]' for m in missing)}.",
        "Searched:",
        *(f"  {folder}" for folder in folders),
        f"Put the IDX files (gzipped or not) in {roots[0] / name}, set KANVOLUTION_DATA to a folder "
        f"holding {name}/, or pass data_dir=... .",
    ]
    if reason:
        lines.append(f"Downloading them failed: {reason}")
    else:
        lines.append("With download=True they are fetched from the official site.")
    return DatasetNotFoundError("\n".join(lines))


def _download_url(url: str, dest: Path, *, md5: str, progress: bool = True) -> None:
    """Fetch ``url`` into ``dest`` atomically, checking its MD5 before the file appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out: BinaryIO) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(total, dest.name) if progress else None
            try:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if digest.hexdigest() != md5:
            raise CorruptDatasetError(
                f"{url}: MD5 {digest.hexdigest()} does not match the published {md5}; nothing was saved"
            )

    atomic_write(dest, fetch)


def _progress_bar(total: int | None, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: download silently
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def download_dataset(
    name: DatasetName,
    root: str | os.PathLike[str] | None = None,
    *,
    splits: tuple[str, ...] = SPLITS,
    progress: bool = True,
) -> Path:
    """Download the official gzipped IDX files of a dataset and verify their MD5 sums.

    Files already present in ``root/<name>/`` are kept. Each file is written to a temporary
    file and renamed only once its checksum matches, so an interrupted download leaves nothing
    behind.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        root: where to put ``<name>/``; by default the first of :func:`search_dirs`.
        splits: which splits to fetch.
        progress: show a tqdm progress bar per file (if tqdm is installed).

    Returns:
        The folder holding the files.

    Raises:
        OSError: the site could not be reached (``urllib.error.URLError`` is an ``OSError``).
        CorruptDatasetError: a downloaded file does not match its published MD5.

    Examples:
        >>> download_dataset("fashion-mnist")  # doctest: +SKIP
        PosixPath('/home/me/.cache/kanvolution/fashion-mnist')
    """
    _check_name(name)
    for split in splits:
        _check_split(split)
    folder = Path(root if root is not None else search_dirs()[0]).expanduser() / name
    for split in splits:
        for stem in _FILES[split]:
            filename = f"{stem}.gz"
            dest = folder / filename
            if dest.is_file():
                continue
            errors: list[str] = []
            for mirror in _MIRRORS[name]:
                try:
                    _download_url(mirror + filename, dest, md5=_MD5[name][filename], progress=progress)
                    break
                except OSError as err:
                    errors.append(f"{mirror}{filename}: {err}")
            else:
                raise OSError("; ".join(errors))
    return folder


def _decompressed(path: Path) -> tuple[bytes, str | None]:
    """The file's IDX bytes, and the MD5 of the file itself when it is gzipped."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw, None
    try:
        return gzip.decompress(raw), hashlib.md5(raw, usedforsecurity=False).hexdigest()
    except (OSError, EOFError, zlib.error) as err:
        raise _corrupt(path, f"broken gzip data ({err})") from err


def _corrupt(path: Path, problem: str) -> CorruptDatasetError:
    return CorruptDatasetError(f"{path}: {problem}; delete the file and download it again")


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise _corrupt(path, f"bad IDX magic number 0x{raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"the header announces {ndim} dims but the file ends after {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(dims)
    if len(raw) != header + count * dtype.itemsize:
        raise _corrupt(path, f"shape {dims} needs {count * dtype.itemsize} data bytes, found {len(raw) - header}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a native-endian numpy array.

    The header is checked strictly: two zero bytes, a known dtype code, the number of dims,
    and a data size that matches the dims exactly.

    Args:
        path: the file; gzip is recognised by its magic bytes, not by the name.

    Raises:
        CorruptDatasetError: naming ``path``, if the file is not a complete, valid IDX file.

    Examples:
        >>> import gzip, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x-idx1-ubyte.gz"
        >>> _ = p.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])))
        >>> read_idx(p)
        array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    return _parse_idx(_decompressed(path)[0], path)


def _identify(raw: bytes, gzip_md5: str | None) -> tuple[str, str] | None:
    """``(dataset, file stem)`` of a known copy (official or shared) with these contents, else None."""
    digest = hashlib.sha256(raw).hexdigest()
    for (name, stem), sums in _KNOWN_SHA256.items():
        if digest in sums:
            return name, stem
    for name, files in _MD5.items():
        for filename, md5 in files.items():
            if md5 == gzip_md5:
                return name, filename.removesuffix(".gz")
    return None


def _verified(name: str, split: str, path: Path, kind: str) -> np.ndarray:
    """One file of a split, parsed and checked to be what it claims to be.

    The checks accept any honest copy (official, re-compressed, re-ordered): IDX structure, the
    split's size, 28x28 uint8 images, labels 0..9 with every class near 10% (exactly 10% for
    Fashion-MNIST), and a file whose contents are a known copy of another dataset's or split's
    file is refused by name.
    """
    raw, gzip_md5 = _decompressed(path)
    array = _parse_idx(raw, path)
    stem = _FILES[split][0 if kind == "images" else 1]
    known = _identify(raw, gzip_md5)
    if known is not None and known != (name, stem):
        raise CorruptDatasetError(
            f"{path} holds {_TITLES[known[0]]}'s {known[1]}, not {_TITLES[name]}'s {stem};"
            f" put the right file there"
        )
    if kind == "images":
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != _IMAGE_SIZE:
            raise CorruptDatasetError(
                f"{path}: expected uint8 images of shape (N, 28, 28), found {array.dtype} {array.shape}"
            )
        return array
    if array.dtype != np.uint8 or array.ndim != 1:
        raise CorruptDatasetError(f"{path}: expected uint8 labels of shape (N,), found {array.dtype} {array.shape}")
    if array.size and array.max() >= _NUM_CLASSES:
        raise CorruptDatasetError(f"{path}: label {array.max()} is outside 0..{_NUM_CLASSES - 1}")
    return array


def _check_split_content(name: str, split: str, images: np.ndarray, labels: np.ndarray, labels_path: Path) -> None:
    if len(labels) != _SPLIT_SIZE[split]:
        raise CorruptDatasetError(
            f"{labels_path}: the {_TITLES[name]} {split} split has {_SPLIT_SIZE[split]} images, this file"
            f" {len(labels)}; put the complete {split} files there"
        )
    shares = np.bincount(labels, minlength=_NUM_CLASSES) / len(labels)
    exact = name == "fashion-mnist"  # 6,000 training and 1,000 test images of each class
    if (exact and not np.all(shares == 1 / _NUM_CLASSES)) or not np.all((shares > 0.08) & (shares < 0.12)):
        found = ", ".join(f"{100 * s:.1f}%" for s in shares)
        expected = "exactly 10% each" if exact else "8-12% each"
        raise CorruptDatasetError(
            f"{labels_path}: class shares {found} are not {_TITLES[name]}'s ({expected}); is it another dataset's file?"
        )


@functools.lru_cache(maxsize=8)
def _read_split(
    name: str, split: str, images_path: Path, labels_path: Path, _stamp: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    # _stamp (mtimes and sizes) is part of the cache key so that a replaced file is re-read.
    images = _verified(name, split, images_path, "images")
    labels = _verified(name, split, labels_path, "labels")
    if len(images) != len(labels):
        raise CorruptDatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    _check_split_content(name, split, images, labels, labels_path)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def _load_shared(
    name: str, split: str, data_dir: str | os.PathLike[str] | None, download: bool
) -> tuple[Tensor, Tensor]:
    """The cached tensors of one split; callers must not modify them."""
    _check_name(name)
    _check_split(split)
    roots = search_dirs(data_dir)
    found = _locate(name, split, roots)
    if found is None:
        if not download:
            raise _not_found(name, split, roots, None)
        try:
            download_dataset(name, roots[0], splits=(split,))
        except OSError as err:
            raise _not_found(name, split, roots, str(err)) from err
        found = _locate(name, split, roots)
        if found is None:  # only if the folder was changed under us
            raise _not_found(name, split, roots, "the downloaded files disappeared")
    images_path, labels_path = (p.resolve() for p in found)
    stamp = tuple(v for p in (images_path, labels_path) for v in (p.stat().st_mtime_ns, p.stat().st_size))
    return _read_split(name, split, images_path, labels_path, stamp)


def load_raw(
    name: DatasetName,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load one split as stored: uint8 images ``(N, 1, 28, 28)`` and int64 labels ``(N,)``.

    The files are looked for in :func:`search_dirs` (``data_dir``, ``$KANVOLUTION_DATA``, the user
    cache folder); if they are in none of them and ``download`` is true, the official files are
    downloaded into the first of those folders. Each split is parsed once per process; every call
    returns fresh tensors, so modifying them is safe.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        data_dir: a folder searched before the others.
        download: fetch missing files from the official site.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetNotFoundError: the files are missing (and could not be downloaded); the message
            lists the folders searched.
        CorruptDatasetError: a file is truncated or not a valid IDX file, or its contents are not
            this dataset's split (size, image shape, label range and class balance are checked,
            and a known copy of another dataset's or split's file is refused by name).

    Examples:
        >>> images, labels = load_raw("fashion-mnist", "test")  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), torch.uint8)
    """
    images, labels = _load_shared(name, split, data_dir, download)
    return images.clone(), labels.clone()


def normalize(images: Tensor) -> Tensor:
    """Map uint8 pixels to float32 in ``[-1, 1]`` exactly as the paper does.

    The paper's ``ToTensor()`` then ``Normalize((0.5,), (0.5,))``: ``(x / 255 - 0.5) / 0.5``,
    computed in the same order in float32, so the values are bit-identical to torchvision's.

    Examples:
        >>> normalize(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-1.,  1.])
    """
    return images.to(torch.float32).div_(255).sub_(0.5).div_(0.5)


def load_dataset(
    name: DatasetName,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load one split as the paper feeds it to the models.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        data_dir: a folder searched before ``$KANVOLUTION_DATA`` and the user cache folder.
        download: fetch missing files from the official site (MD5-checked).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` (see :func:`normalize`)
        and int64 ``(N,)`` in ``0..9``.

    Raises:
        ValueError, DatasetNotFoundError, CorruptDatasetError: as :func:`load_raw`.

    Examples:
        >>> x, y = load_dataset("fashion-mnist", "train", data_dir="~/datasets")  # doctest: +SKIP
        >>> x.shape, y.shape  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), torch.Size([60000]))
    """
    images, labels = _load_shared(name, split, data_dir, download)
    return normalize(images), labels.clone()


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`iterate_batches` yields for ``n`` samples.

    Examples:
        >>> num_batches(10, 4), num_batches(10, 4, drop_last=True)
        (3, 2)
    """
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` mini-batches by tensor indexing, with no per-sample Python.

    Without shuffling the batches are views (slices); with shuffling one permutation is drawn
    per call, so every sample appears exactly once per pass.

    Args:
        images: ``(N, ...)`` tensor.
        labels: ``(N, ...)`` tensor with the same ``N``.
        batch_size: samples per batch; the last batch may be smaller unless ``drop_last``.
        shuffle: visit the samples in a random order.
        generator: the random source of the permutation, for reproducible epochs; the global
            torch RNG if ``None``.
        drop_last: skip a final batch smaller than ``batch_size``.

    Examples:
        >>> x, y = torch.arange(10).view(10, 1).float(), torch.arange(10)
        >>> [b.tolist() for _, b in iterate_batches(x, y, 4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> g = torch.Generator().manual_seed(0)
        >>> sorted(i for _, b in iterate_batches(x, y, 3, shuffle=True, generator=g) for i in b.tolist())
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    # Checked above, batched below: a bad argument fails at the call, not at the first next().
    return _batches(images, labels, batch_size, shuffle, generator, drop_last)


def _batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[tuple[Tensor, Tensor]]:
    n = images.shape[0]
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=device)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield images[index.to(images.device)], labels[index.to(labels.device)]


def train_val_split(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` into random train and validation indices, reproducibly.

    Identical to ``torch.utils.data.random_split(range(n), [1 - val_fraction, val_fraction],
    generator=torch.Generator().manual_seed(seed))`` (the paper's 80/20 split at seed 0), as
    int64 index tensors.

    Args:
        n: number of samples.
        val_fraction: share of the samples held out, strictly between 0 and 1.
        seed: seed of the permutation.

    Returns:
        ``(train_idx, val_idx)``.

    Examples:
        >>> train_idx, val_idx = train_val_split(10)
        >>> len(train_idx), len(val_idx)
        (8, 2)
        >>> sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(10))
        True
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    # Same arithmetic as random_split with fractions: floor each part, then hand out the
    # remainder one by one starting with the first part.
    lengths = [math.floor(n * (1 - val_fraction)), math.floor(n * val_fraction)]
    for i in range(n - sum(lengths)):
        lengths[i % 2] += 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: lengths[0]], order[lengths[0] :]


def augment_batch(
    images: Tensor,
    *,
    crop_padding: int = 0,
    hflip: bool = False,
    generator: torch.Generator | None = None,
    fill: float = -1.0,
) -> Tensor:
    """Random crops (and horizontal flips) of a batch of images, drawn per image, on tensors.

    Each image is padded by ``crop_padding`` pixels of ``fill`` on every side and cropped back to
    its size at a uniformly random offset; with ``hflip`` each image is then mirrored left-right
    with probability 1/2. The draws come from ``generator`` only, so a seeded generator gives the
    same batches again.

    Args:
        images: ``(N, C, H, W)``.
        crop_padding: padding of the random crop in pixels; 0 = no crop.
        hflip: mirror half the images (on average).
        generator: the random source (the global torch RNG if ``None``).
        fill: the value of padded pixels; -1 is black in :func:`normalize`'s range.

    Returns:
        A new ``(N, C, H, W)`` tensor (``images`` itself when nothing is asked).

    Examples:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_batch(x, crop_padding=1, generator=g).shape
        torch.Size([1, 1, 4, 4])
        >>> bool((augment_batch(x) == x).all())
        True
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
        raise ValueError(f"crop_padding must be a non-negative int, got {crop_padding!r}")
    n, _, height, width = images.shape
    out = images
    if crop_padding:
        p = crop_padding
        padded = torch.nn.functional.pad(images, (p, p, p, p), value=fill)
        offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator).to(images.device)
        rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
    if hflip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out
