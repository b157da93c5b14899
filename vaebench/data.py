"""MNIST-family data: IDX files in torchvision's layout, data roots, checksummed downloads,
device-resident splits (docs/data.md). Files already present are read as they are, never
deleted or overwritten; only files vaebench downloads are checked against their md5."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaebench.atomic import atomic_file
from vaebench.spec.config import DataConfig, VaebenchError

DATA_ENV = "VAEBENCH_DATA"
# Fixed Bernoulli draws of binarized splits, one seed per split (the same for every run):
# the test split's draw is independent of the training one, as the literature's protocol asks.
BINARIZE_SEEDS = {"train": 1234, "validation": 2345, "test": 3456}


class DataError(VaebenchError):
    """Missing, malformed or undownloadable data files."""


@dataclass(frozen=True)
class DatasetInfo:
    folder: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]  # file name -> md5 of the .gz

    train_files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test_files = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _md5(*digests: str) -> dict[str, str]:
    """The files' md5s, given in the order training images, labels, test images, labels."""
    return dict(zip(DatasetInfo.train_files + DatasetInfo.test_files, digests, strict=True))


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "MNIST",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        _md5("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fashion_mnist": DatasetInfo(
        "FashionMNIST",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        _md5("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    "kmnist": DatasetInfo(
        "KMNIST",
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        _md5("bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
             "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"),
    ),
}


def resolve_root(cli_root: str | os.PathLike[str] | None = None) -> Path:
    """``--data-root``, else ``$VAEBENCH_DATA``, else ``./data``."""
    chosen = cli_root or os.environ.get(DATA_ENV) or "data"
    return Path(chosen).expanduser().resolve()


def raw_dir(dataset: str, root: Path) -> Path:
    return root / DATASETS[dataset].folder / "raw"


def find_file(folder: Path, name: str) -> Path | None:
    """The ``.gz`` file, or the extracted file torchvision leaves beside it."""
    candidates = (folder / name, folder / name.removesuffix(".gz"))
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def download_file(url: str, target: Path, md5: str, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``target`` through a temporary file, checking its md5: nothing is
    left behind on failure; ``target`` appears only when complete."""
    digest = hashlib.md5()
    with atomic_file(target) as out, urllib.request.urlopen(url, timeout=timeout) as response:
        for block in iter(lambda: response.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
        if digest.hexdigest() != md5:
            raise DataError(
                f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}"
            )


def ensure_files(
    dataset: str, root: Path, names: Sequence[str], mirrors: Sequence[str] | None = None
) -> dict[str, Path]:
    info = DATASETS[dataset]
    sources = list(mirrors if mirrors is not None else info.mirrors)
    folder = raw_dir(dataset, root)
    found = {name: find_file(folder, name) for name in names}
    last_failures: list[str] = []  # why each mirror failed for the last file that failed
    for name in [name for name, path in found.items() if path is None]:
        failures = []
        for mirror in sources:
            try:
                download_file(mirror + name, folder / name, info.md5[name])
                found[name] = folder / name
                break
            except (DataError, OSError, http.client.HTTPException) as exc:
                # URLError is an OSError; HTTPException covers broken or cut-off replies
                reason = getattr(exc, "reason", None) or exc or type(exc).__name__
                failures.append(f"{mirror + name}: {reason}")
        else:
            last_failures = failures
    still_missing = [name for name, path in found.items() if path is None]
    if still_missing:
        raise DataError(
            f"{dataset}: missing {', '.join(still_missing)} in {folder} and the download failed "
            f"({'; '.join(last_failures)}); copy the files there, or point "
            f"--data-root or ${DATA_ENV} at a folder holding {info.folder}/raw/"
        )
    return {name: path for name, path in found.items() if path is not None}


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array; DataError names the file.

    A gzipped file is inflated whole (``gzip.decompress``: one zlib call per gzip member,
    each member's trailer checked), not through ``gzip.open``'s 8 KiB reads: each of those
    gives up the GIL and waits for it again, and while the MLflow store is being created in
    another thread (as it is during preflight) that made reading MNIST take about 2 s
    instead of 0.2 s."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {expected} bytes of data for shape {shape}, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: expected images of shape (N, rows, cols), got {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels"
        )
    return images, labels


def ensure_dataset(dataset: str, root: Path) -> dict[str, Path]:
    return ensure_files(dataset, root, DatasetInfo.train_files + DatasetInfo.test_files)


@functools.lru_cache(maxsize=4)
def load_arrays(dataset: str, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 images and labels of both splits, read once per process."""
    info, paths = DATASETS[dataset], ensure_dataset(dataset, root)
    return {
        "train": read_pair(*(paths[name] for name in info.train_files)),
        "test": read_pair(*(paths[name] for name in info.test_files)),
    }


@dataclass
class Split:
    """One split on the run's device: images ``(N, 1, H, W)`` float in [0, 1], labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Splits:
    """Train, validation (held out of the training images; None with ``validation: 0``), test."""

    train: Split
    validation: Split | None
    test: Split
    dynamic_binarize: bool = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class SplitRecord:
    """What a run says about one split it used, for MLflow's dataset inputs: ``digest`` is a
    hash of the exact images and labels (after subset, hold-out and binarization)."""

    name: str  # e.g. mnist-train
    context: str  # training, validation or test
    digest: str
    source: str  # the raw folder the images came from
    rows: int


def split_digest(split: Split) -> str:
    """SHA-256 (first 16 hex digits) of a split's images and labels as stored."""
    digest = hashlib.sha256()
    for tensor in (split.images, split.labels):  # their bytes, hashed without a copy
        digest.update(tensor.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()[:16]


def split_records(splits: Splits, config: DataConfig, root: Path) -> list[SplitRecord]:
    """The splits a run uses, for MLflow (the training split's draws, with dynamic
    binarization, are new every batch: its digest is of the grey levels they are drawn from)."""
    source = str(raw_dir(config.dataset, root))
    named = [("train", "training", splits.train), ("validation", "validation", splits.validation),
             ("test", "test", splits.test)]
    return [
        SplitRecord(f"{config.dataset}-{name}", context, split_digest(split), source, len(split))
        for name, context, split in named
        if split is not None
    ]


def to_split(images: np.ndarray, labels: np.ndarray, device: torch.device) -> Split:
    pixels = torch.from_numpy(np.array(images, copy=True)).to(device)  # IDX buffers are read-only
    return Split(
        images=pixels.unsqueeze(1).to(torch.float32).div_(255.0),
        labels=torch.from_numpy(labels.astype(np.int64, copy=True)).to(device),
    )


def binarize_fixed(split: Split, seed: int) -> Split:
    """One fixed Bernoulli draw of every pixel (the same for every run)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draw = torch.rand(split.images.shape, generator=generator).to(split.images.device)
    return Split(images=(draw < split.images).to(split.images.dtype), labels=split.labels)


def split_training_images(
    count: int, validation: int, subset: int | None, dataset: str = "mnist"
) -> tuple[slice, slice]:
    """(training slice, validation slice) of the ``count`` training images: validation is the
    last ``validation`` images, ``subset`` the first of what remains, so every run and seed sees
    the same validation split."""
    if validation >= count:
        raise DataError(
            f"data.validation: {validation} leaves none of the {count} training images of "
            f"{dataset} to train on"
        )
    remaining = count - validation
    if subset is not None and subset > remaining:
        raise DataError(
            f"data.subset: {subset} exceeds the {remaining} training images of {dataset} "
            f"that data.validation ({validation}) leaves"
        )
    return slice(0, subset if subset is not None else remaining), slice(remaining, count)


def load_splits(config: DataConfig, root: Path, device: torch.device) -> Splits:
    """The splits of ``config.dataset`` on ``device``, held out, subset and binarized. ``dynamic``
    binarization redraws training pixels every batch (the trainer does it); validation and test
    get one fixed draw each so evaluations stay comparable."""
    arrays = load_arrays(config.dataset, root)
    images, labels = arrays["train"]
    train_part, validation_part = split_training_images(
        len(images), config.validation, config.subset, config.dataset
    )
    train = to_split(images[train_part], labels[train_part], device)
    validation = None
    if config.validation:
        validation = to_split(images[validation_part], labels[validation_part], device)
    test = to_split(*arrays["test"], device)
    if config.binarize == "static":
        train = binarize_fixed(train, BINARIZE_SEEDS["train"])
    if config.binarize in ("static", "dynamic"):
        test = binarize_fixed(test, BINARIZE_SEEDS["test"])
        if validation is not None:
            validation = binarize_fixed(validation, BINARIZE_SEEDS["validation"])
    return Splits(train, validation, test, dynamic_binarize=config.binarize == "dynamic")
