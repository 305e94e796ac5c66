"""Datasets: MNIST / Fashion-MNIST / CIFAR-10 / CIFAR-100 loaders, downloads, binary subsets, synthetic data.

Loaders read the datasets' canonical files under ``config.data_dir(root)``
(``$MARGINLAB_DATA``, default ``~/.cache/marginlab/data``):

* MNIST          ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (torchvision layout)
* Fashion-MNIST  ``<root>/FashionMNIST/raw/`` (same file names)
* CIFAR-10       ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
* CIFAR-100      ``<root>/cifar-100-python/{train,test}``

Sizes are read from the files (idx headers, pickle arrays), so subsets of the
official sets load like the full sets.

Downloads (when files are missing and ``download=True``) use ``urllib`` only:

* the body is streamed to ``<dest>.part``; its MD5 is verified *before* the file
  is renamed into place (``os.replace``, atomic) and before anything is
  extracted or unpickled;
* archives are extracted into a temporary directory inside the root (members
  with absolute paths, ``..``, links or device files are rejected) and the
  dataset folder is then renamed into place atomically;
* a checksum mismatch deletes the ``.part`` file and raises :class:`ChecksumError`;
* an interrupted transfer keeps ``<dest>.part`` **only if the server advertised
  byte ranges** (``Accept-Ranges: bytes``): the next attempt resumes it with a
  ``Range`` request (appending on ``206``; restarting cleanly on ``200``/``416``).
  Otherwise the ``.part`` is deleted. No other partial file or folder is left;
* offline, :class:`DownloadError` (a ``RuntimeError``) names the missing files,
  the URLs tried and the variable ``MARGINLAB_DATA``.

Environment variables: ``MARGINLAB_DATA`` (root), ``MARGINLAB_MIRROR`` (base URL
that replaces the official mirrors: file URL = ``$MARGINLAB_MIRROR/<filename>``;
``{dataset}`` in it is replaced by the dataset name), ``MARGINLAB_CHECKSUMS``
(path of a JSON file ``{filename: md5}`` overriding the official checksums, for
private mirrors that host re-packed files), ``CI`` (disables progress bars).

Command line: ``python -m marginlab.data fetch all|mnist|fashion_mnist|cifar10|cifar100 [--root DIR]``.

Sizes and profiles (:func:`require`, :func:`loaded_sizes`):

* the ``full`` profile needs the complete official sets (:data:`FULL_SIZES`: MNIST 60,000/10,000,
  CIFAR-10 and CIFAR-100 50,000/10,000). A chapter calls ``data.require(...)`` in its first cell: missing
  files are downloaded; files that are present but smaller (the offline subsets) or a failed download stop
  the run with one message naming every file, its size and ``python -m marginlab.data fetch all``. As a
  second line of defence :func:`load` itself refuses a short split in the full profile, so results of a
  subset can never be written to ``results/full/``;
* ``quick`` and ``standard`` run on whatever the files hold (sizes are read from the files);
* ``smoke`` (``MARGINLAB_SMOKE=1``: the full profile's code paths at toy sizes) skips the size check and,
  when CIFAR-100 is absent, stands it in by the CIFAR-10 files relabelled to 100 classes
  (:data:`CIFAR100_STANDIN`) so that the CIFAR-100 code paths run offline; the stand-in is recorded in
  :func:`loaded_sizes` and never used outside a smoke run.

:func:`loaded_sizes` is a process-wide record of what :func:`load` returned (``n_train``/``n_test`` per data
set, for the results' provenance).
"""
from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import http.client
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import config
from .train import _progress_enabled, progress_bar  # text bars on a headless run, widgets in a notebook

__all__ = [
    "DATASETS", "SPLITS", "RESOURCES", "CIFAR10_CLASSES", "DownloadError", "ChecksumError",
    "FULL_SIZES", "CIFAR100_STANDIN", "DataSizeError", "require", "loaded_sizes", "reset_loaded_sizes",
    "load", "fetch", "clear_cache", "binary_subset", "to_class_index", "subsample",
    "gaussian_blobs", "two_point", "affine_subspace_data", "main",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")
#: what ``fetch("all")`` downloads: the datasets the book uses
FETCH_ALL = ("mnist", "cifar10", "cifar100")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

#: name -> list of (mirror base URLs, filename, md5). The URL of a file is ``base + filename``;
#: mirrors are tried in order. Tests monkeypatch this table.
RESOURCES: dict[str, list[tuple[tuple[str, ...], str, str]]] = {
    "mnist": [
        (MNIST_MIRRORS, "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (MNIST_MIRRORS, "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        (MNIST_MIRRORS, "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        (MNIST_MIRRORS, "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "fashion_mnist": [
        (FASHION_MNIST_MIRRORS, "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (FASHION_MNIST_MIRRORS, "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        (FASHION_MNIST_MIRRORS, "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        (FASHION_MNIST_MIRRORS, "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "cifar10": [(CIFAR_MIRRORS, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
    "cifar100": [(CIFAR_MIRRORS, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")],
}


@dataclass(frozen=True)
class _Layout:
    folder: str                     # dataset folder relative to the root
    files: dict[str, tuple[str, ...]]  # split -> files (relative to folder) that the split reads
    archive: bool                   # True: RESOURCES holds one archive that extracts to `folder`


_LAYOUTS = {
    "mnist": _Layout("MNIST/raw", _MNIST_FILES, archive=False),
    "fashion_mnist": _Layout("FashionMNIST/raw", _MNIST_FILES, archive=False),
    "cifar10": _Layout(
        "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        archive=True,
    ),
    "cifar100": _Layout("cifar-100-python", {"train": ("train",), "test": ("test",)}, archive=True),
}

_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, ("cifar100", "fine"): 100,
                ("cifar100", "coarse"): 20}
_IDX_IMAGES_MAGIC = 0x00000803  # 0x08 = unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # 0x08 = unsigned byte, 1 dimension
_CHUNK = 1 << 16


#: Split sizes of the official sets: what the full profile needs.
FULL_SIZES: dict[str, dict[str, int]] = {
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
}
#: What stands in for an absent CIFAR-100 in a smoke run (the full profile's code paths at toy sizes, offline):
#: the CIFAR-10 images, fine label = 10 * (CIFAR-10 label) + (index mod 10), coarse label = fine // 5, so that
#: 100 (20) classes occur and the 100-class code paths run. Never used outside a smoke run.
CIFAR100_STANDIN = "cifar10 images relabelled to 100 classes (smoke run only)"

_LOADED: dict[str, dict[str, Any]] = {}  # process-wide record of what load() returned
_STANDINS: dict[str, str] = {}  # dataset -> stand-in, registered by require() in a smoke run


class DataSizeError(RuntimeError):
    """The run's profile needs complete data sets and a file holds fewer examples (or is missing)."""


class DownloadError(RuntimeError):
    """A dataset could not be downloaded (offline, server error, interrupted transfer)."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the expected MD5 (its partial file has been deleted)."""


# --------------------------------------------------------------------------- argument checks
def _check_name(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _check_label_type(label_type: str) -> str:
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
    return label_type


# --------------------------------------------------------------------------- public loading API
def load(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    label_type: str = "fine",
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as ``(x, y)``: x float32 (N, C, H, W) in [0, 1], y int64 (N,).

    ``name`` in ``"mnist" | "fashion_mnist" | "cifar10" | "cifar100"``; ``split`` in
    ``"train" | "test"``; ``label_type`` (CIFAR-100 only) ``"fine"`` (100 classes) or
    ``"coarse"`` (20 superclasses). Missing files are downloaded (checksum verified)
    when ``download`` is true, else :class:`FileNotFoundError`. Decoded arrays are
    cached in memory; every call returns fresh tensors, so callers may modify them.
    """
    name, split = _check_name(name), _check_split(split)
    label_type = _check_label_type(label_type)
    if name != "cifar100" and label_type != "fine":
        raise ValueError(f"label_type={label_type!r} only applies to cifar100")
    base = config.data_dir(root)
    if name in _STANDINS and config.run_name() == "smoke" and not _present(name, base):
        return _load_standin(name, split, root, label_type, progress)
    paths = _split_paths(name, split, base)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(
                f"{name} ({split}) files missing: {', '.join(map(str, missing))}. Call load(..., download=True), "
                f"or run `python -m marginlab.data fetch {name} --root DIR` and set MARGINLAB_DATA=DIR "
                f"(MARGINLAB_DATA is {os.environ.get('MARGINLAB_DATA')!r})."
            )
        _ensure(name, base, progress=progress)
    signature = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    images, labels = _decoded(name, split, str(base.resolve()), label_type, signature)
    if config.run_name() == "full" and images.shape[0] < FULL_SIZES[name][split]:
        raise DataSizeError(_size_message([(name, split, images.shape[0], paths)], []))
    _record(name, split, images.shape[0], paths)
    # fresh tensors every call: the cached arrays are read-only and never handed out
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _record(name: str, split: str, n: int, paths: Sequence[Path], standin: str | None = None) -> None:
    entry = _LOADED.setdefault(name, {})
    entry[split] = int(n)
    entry.setdefault("files", {})[split] = [str(p) for p in paths]
    if standin is not None:
        entry["standin"] = standin


def loaded_sizes() -> dict[str, dict[str, Any]]:
    """What :func:`load` has returned in this process: ``{name: {"train": n, "test": n, "files": {split:
    [paths]}, ["standin": ...]}}`` — the data sizes of a run's provenance (``n_train`` = ``["train"]``)."""
    return {k: {kk: (dict(vv) if isinstance(vv, dict) else vv) for kk, vv in v.items()} for k, v in _LOADED.items()}


def reset_loaded_sizes() -> None:
    """Forget the record of :func:`loaded_sizes` (e.g. between two chapters run in one process)."""
    _LOADED.clear()


def _present(name: str, base: Path) -> bool:
    return all(p.is_file() for split in SPLITS for p in _split_paths(name, split, base))


def _load_standin(name: str, split: str, root: Any, label_type: str,
                  progress: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`CIFAR100_STANDIN`: CIFAR-10 images with 100 fine (20 coarse) labels."""
    x, y10 = load("cifar10", split, root, progress=progress)
    fine = y10 * 10 + torch.arange(len(y10)) % 10
    y = fine if label_type == "fine" else fine // 5
    _record(name, split, len(x), _split_paths("cifar10", split, config.data_dir(root)), standin=_STANDINS[name])
    return x, y


def _split_size(name: str, split: str, base: Path) -> int:
    """Examples in a split's files, from the idx header (MNIST) or the decoded pickles (CIFAR, cached)."""
    paths = _split_paths(name, split, base)
    if name in ("mnist", "fashion_mnist"):
        try:
            with gzip.open(paths[0], "rb") as f:
                head = f.read(8)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{paths[0]}: not a readable gzip file (corrupted or truncated?): {e}") from e
        if len(head) < 8 or int.from_bytes(head[:4], "big") != _IDX_IMAGES_MAGIC:
            raise ValueError(f"{paths[0]}: not an idx image file")
        return int.from_bytes(head[4:8], "big")
    signature = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    return int(_decoded(name, split, str(base.resolve()), "fine", signature)[0].shape[0])


def _size_message(short: Sequence[tuple[str, str, int, Sequence[Path]]],
                  missing: Sequence[tuple[str, str]]) -> str:
    lines = [f"The {config.run_name()} profile needs the complete data sets (results/full/ is written from "
             "nothing less), but:"]
    for name, split, n, paths in short:
        files = ", ".join(str(p) for p in paths)
        lines.append(f"  {name} {split}: {n:,} examples, the full set has {FULL_SIZES[name][split]:,} ({files})")
    for name, why in missing:
        lines.append(f"  {name}: {why}")
    lines.append(
        "Fix: run `python -m marginlab.data fetch all` on a machine with internet (add `--root DIR`, copy DIR "
        f"here) and point MARGINLAB_DATA at the complete sets (now MARGINLAB_DATA="
        f"{os.environ.get('MARGINLAB_DATA')!r}); or run MARGINLAB_PROFILE=standard (or quick) on the subsets, "
        "or MARGINLAB_SMOKE=1 for the full profile's code paths at toy sizes."
    )
    return "\n".join(lines)


def require(*names: str, profile: str | None = None, root: str | os.PathLike | None = None,
            download: bool = True, progress: bool | None = None) -> dict[str, dict[str, int]]:
    """Check, at the start of a chapter, that the data sets it needs suit the run; returns ``{name: {split: n}}``
    for the names checked (empty outside the full profile).

    ``profile``: ``"quick" | "standard" | "full" | "smoke"`` (default :func:`config.run_name`).

    * full: every split of every name must hold :data:`FULL_SIZES` examples. Missing files are downloaded
      (``download=True``); files that are present but smaller are never overwritten. Anything short or missing
      raises one :class:`DataSizeError` naming every file, its size and ``python -m marginlab.data fetch all``.
    * smoke: no size check; an absent CIFAR-100 is stood in by :data:`CIFAR100_STANDIN` for this process.
    * quick, standard: nothing to check (the loaders read the sizes from the files).
    """
    keys = [_check_name(n) for n in names]
    run = config.run_name() if profile is None else str(profile).lower()
    if run not in ("quick", "standard", "full", "smoke"):
        raise ValueError(f"profile must be 'quick', 'standard', 'full' or 'smoke', got {profile!r}")
    base = config.data_dir(root)
    if run == "smoke":
        for name in keys:
            if name == "cifar100" and not _present(name, base):
                _STANDINS[name] = CIFAR100_STANDIN
        return {}
    if run != "full":
        return {}
    sizes: dict[str, dict[str, int]] = {}
    short: list[tuple[str, str, int, list[Path]]] = []
    missing: list[tuple[str, str]] = []
    for name in keys:
        if not _present(name, base):
            absent = [str(p) for s_ in SPLITS for p in _split_paths(name, s_, base) if not p.is_file()]
            if not download:
                missing.append((name, f"missing {', '.join(absent)}"))
                continue
            try:
                _ensure(name, base, progress=progress)
            except (DownloadError, ValueError) as e:
                missing.append((name, f"missing {', '.join(absent)}; the download failed: "
                                      f"{str(e).splitlines()[0]}"))
                continue
        sizes[name] = {}
        for split in SPLITS:
            n = _split_size(name, split, base)
            sizes[name][split] = n
            if n < FULL_SIZES[name][split]:
                short.append((name, split, n, _split_paths(name, split, base)))
    if short or missing:
        raise DataSizeError(_size_message(short, missing))
    return sizes


def clear_cache() -> None:
    """Forget the decoded arrays kept in memory by :func:`load`."""
    _decoded.cache_clear()


def fetch(
    name: str = "all", root: str | os.PathLike | None = None, *, progress: bool | None = None
) -> dict[str, Path]:
    """Make sure a dataset's files are present under the root (download if needed, for offline use).

    ``name``: a dataset name or ``"all"`` (= mnist, cifar10, cifar100). Returns ``{name: folder}``.
    """
    names = FETCH_ALL if name == "all" else (_check_name(name),)
    base = config.data_dir(root)
    return {n: _ensure(n, base, progress=progress) for n in names}


def _split_paths(name: str, split: str, base: Path) -> list[Path]:
    layout = _LAYOUTS[name]
    return [base / layout.folder / f for f in layout.files[split]]


@functools.lru_cache(maxsize=8)
def _decoded(
    name: str, split: str, root: str, label_type: str, signature: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split to (uint8 images (N,C,H,W), int64 labels); ``signature`` invalidates on file changes."""
    paths = [Path(p) for p, _, _ in signature]
    if name in ("mnist", "fashion_mnist"):
        images = _read_idx(paths[0], _IDX_IMAGES_MAGIC)
        labels = _read_idx(paths[1], _IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds {labels.shape[0]} labels")
        images = images[:, None, :, :]
        n_classes = _NUM_CLASSES[name]
    else:
        key = "labels" if name == "cifar10" else f"{label_type}_labels"
        parts = [_read_cifar_batch(p, key) for p in paths]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        n_classes = _NUM_CLASSES[name] if name == "cifar10" else _NUM_CLASSES[(name, label_type)]
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name} {split}: labels outside 0..{n_classes - 1} in {', '.join(map(str, paths))}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# --------------------------------------------------------------------------- decoders
def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode a gzipped idx file (LeCun's format: big-endian magic, dims, then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation -> EOFError
        raise ValueError(f"{path}: not a readable gzip file (corrupted or truncated?): {e}") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: idx header announces {dims} = {expected - header} bytes of data, "
            f"file holds {len(raw) - header} (truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _numpy_global(module: str, name: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core -> numpy._core
    table = {"_reconstruct": core.multiarray._reconstruct, "scalar": core.multiarray.scalar}
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in table:
        return table[name]
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module.startswith("numpy") and name.endswith("DType"):  # numpy 2 dtype classes
        return getattr(getattr(np, "dtypes", None), name, None)
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtins: the CIFAR batches need nothing else,
    and refusing other globals means a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _numpy_global(module, name)
        if obj is not None:
            return obj
        if (module, name) == ("_codecs", "encode"):  # protocol-2 encoding of bytes
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR pickle (dict with ``data`` uint8 (N, 3072) channel-major and a label list)."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any failure to decode (garbage can raise OverflowError, struct.error, ...)
        raise ValueError(f"{path}: not a valid CIFAR pickle (corrupted or truncated?): {e!r}") from e
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys 'data' and {label_key!r}, found {keys}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --------------------------------------------------------------------------- downloading
def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _urls(name: str, mirrors: Sequence[str], filename: str) -> list[str]:
    override = os.environ.get("MARGINLAB_MIRROR")
    if override:
        mirrors = (override.replace("{dataset}", name),)
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    return [m if m.endswith("/" + filename) else m.rstrip("/") + "/" + filename for m in mirrors]


def _expected_md5(filename: str, md5: str) -> str:
    manifest = os.environ.get("MARGINLAB_CHECKSUMS")
    if not manifest:
        return md5
    try:
        table = json.loads(Path(manifest).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"MARGINLAB_CHECKSUMS={manifest!r}: cannot read a JSON {{filename: md5}} file: {e}") from e
    return str(table.get(filename, md5))


def _show_progress(progress: bool | None) -> bool:
    return _progress_enabled(progress)


class _Interrupted(OSError):
    """The server closed the connection before the announced body was complete."""


def _transfer(url: str, part: Path, desc: str, progress: bool | None, timeout: float) -> bool:
    """Stream ``url`` into ``part`` (resuming an existing ``part`` with a Range request).

    Returns whether the body was appended to an existing partial file. On an error the
    partial file is kept only when the server advertised byte ranges (resumable).
    """
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "marginlab"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our partial file does not fit the server's file: restart
            e.close()
            part.unlink()
            return _transfer(url, part, desc, progress, timeout)
        raise
    resumable = False
    try:
        with response:
            resumable = response.headers.get("Accept-Ranges", "").lower() == "bytes"
            length = response.headers.get("Content-Length")
            resumed = False
            if response.status == 206:
                start = response.headers.get("Content-Range", "").partition(" ")[2].partition("-")[0]
                resumed = start == str(offset)
                resumable = True
                if not resumed:  # unexpected range: discard and restart from scratch
                    response.close()
                    part.unlink()
                    return _transfer(url, part, desc, progress, timeout)
            total = int(length) if length is not None else None
            written = 0
            with open(part, "ab" if resumed else "wb") as f, progress_bar(None,
                total=None if total is None else total + (offset if resumed else 0),
                initial=offset if resumed else 0, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=not _show_progress(progress), leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if total is not None and written != total:
                raise _Interrupted(f"connection closed after {written} of {total} bytes")
            return resumed
    except BaseException:  # also Ctrl-C: a partial file stays only if it can be resumed
        if part.is_file() and (not resumable or part.stat().st_size == 0):
            part.unlink()
        raise


def _download(name: str, mirrors: Sequence[str], dest: Path, md5: str, *, progress: bool | None,
              timeout: float = 60.0) -> None:
    """Download ``dest`` from the first mirror that works; verify MD5 before the atomic rename."""
    md5 = _expected_md5(dest.name, md5)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    urls = _urls(name, mirrors, dest.name)
    failures: list[str] = []
    for url in urls:
        for _ in range(2):  # a resumed file that fails the checksum gets one clean retry
            try:
                resumed = _transfer(url, part, dest.name, progress, timeout)
            except (OSError, http.client.HTTPException) as e:
                failures.append(f"{url}: {e}")
                break
            got = _md5(part)
            if got == md5:
                os.replace(part, dest)
                return
            part.unlink()
            if not resumed:
                raise ChecksumError(
                    f"checksum mismatch for {dest.name} downloaded from {url}: md5 {got}, expected {md5}. "
                    f"The partial file was deleted; nothing was extracted. Retry, or use another mirror "
                    f"(MARGINLAB_MIRROR)."
                )
    kept = f"\n  a partial file {part} was kept; the next attempt resumes it." if part.is_file() else ""
    raise DownloadError("\n  tried " + "\n  tried ".join(failures) + kept)


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in parts:
            raise ValueError(f"{archive}: unsafe path in archive: {m.name!r}")
        if not (m.isfile() or m.isdir()):
            raise ValueError(f"{archive}: refusing non-regular archive member {m.name!r}")
    return members


def _extract(archive: Path, base: Path, folder: str, required: Sequence[str]) -> None:
    """Extract ``archive`` into a temp dir inside ``base`` and atomically rename ``folder`` into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=base))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _safe_members(tar, archive)
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise ValueError(f"{archive}: cannot extract ({e})") from e
        missing = [f for f in required if not (tmp / folder / f).is_file()]
        if missing:
            raise ValueError(f"{archive}: archive lacks {folder}/{', '.join(missing)}")
        os.replace(tmp / folder, base / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure(name: str, base: Path, *, progress: bool | None = None) -> Path:
    """Download (and extract) whatever of dataset ``name`` is missing under ``base``; return its folder."""
    layout = _LAYOUTS[name]
    folder = base / layout.folder
    required = sorted({f for files in layout.files.values() for f in files})
    missing = [f for f in required if not (folder / f).is_file()]
    if not missing:
        return folder
    resources = RESOURCES[name]
    # folders this call creates are removed again if the download fails (nothing half-made is left)
    created = [d for d in (folder, *folder.parents) if not d.exists()]
    try:
        if not layout.archive:
            for mirrors, filename, md5 in resources:
                if filename in missing:
                    _download(name, mirrors, folder / filename, md5, progress=progress)
            return folder
        if folder.exists():
            raise ValueError(
                f"{folder} exists but lacks {', '.join(missing)}; remove the folder to download {name} again."
            )
        (mirrors, filename, md5), = resources
        archive = base / filename
        base.mkdir(parents=True, exist_ok=True)
        # a previously downloaded archive is reused only if it passes the checksum
        if not (archive.is_file() and _md5(archive) == _expected_md5(filename, md5)):
            _download(name, mirrors, archive, md5, progress=progress)
        _extract(archive, base, layout.folder, required)
        return folder
    except BaseException as e:
        for d in created:  # deepest first; only empty ones (a resumable .part keeps its folder)
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        if isinstance(e, ChecksumError) or not isinstance(e, DownloadError):
            raise
        # one message for the whole dataset: what is missing, where from, how to fix it offline
        raise DownloadError(
            f"{name}: missing {', '.join(missing)} in {folder}, and the download failed:{e}\n"
            f"If this machine is offline, run `python -m marginlab.data fetch {name} --root DIR` where there is "
            f"internet, copy DIR here and set MARGINLAB_DATA=DIR (now MARGINLAB_DATA="
            f"{os.environ.get('MARGINLAB_DATA')!r}, data root {base})."
        ) from e


# --------------------------------------------------------------------------- subsets and labels
def _class_index(c: int | str, what: str) -> int:
    if isinstance(c, str):
        if c not in CIFAR10_CLASSES:
            raise ValueError(f"{what} class {c!r} is not a CIFAR-10 class name; valid: {', '.join(CIFAR10_CLASSES)}")
        return CIFAR10_CLASSES.index(c)
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
        raise ValueError(f"{what} class must be an int label or a CIFAR-10 class name, got {c!r}")
    return int(c)


def binary_subset(x: Any, y: Any, positive: int | str, negative: int | str) -> tuple[Any, Any]:
    """Keep the examples of two classes (order preserved); labels become int64 +1 (``positive``) / -1.

    ``positive``/``negative``: integer labels, or CIFAR-10 class names (``"airplane"``, ``"horse"``...).
    Works on torch tensors (returns tensors) and numpy arrays (returns arrays).
    """
    p, n = _class_index(positive, "positive"), _class_index(negative, "negative")
    if p == n:
        raise ValueError(f"positive and negative are the same class ({positive!r})")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    if isinstance(y, torch.Tensor):
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D class indices, got shape {tuple(y.shape)}")
        is_p, is_n = y == p, y == n
        for c, mask, what in ((positive, is_p, "positive"), (negative, is_n, "negative")):
            if not bool(mask.any()):
                raise ValueError(f"{what} class {c!r} does not occur in y")
        keep = is_p | is_n
        y_pm = torch.where(is_p[keep], 1, -1).to(torch.int64)
        return x[keep.to(x.device) if isinstance(x, torch.Tensor) else keep.cpu().numpy()], y_pm
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D class indices, got shape {y.shape}")
    is_p, is_n = y == p, y == n
    for c, mask, what in ((positive, is_p, "positive"), (negative, is_n, "negative")):
        if not mask.any():
            raise ValueError(f"{what} class {c!r} does not occur in y")
    keep = is_p | is_n
    return x[keep], np.where(is_p[keep], 1, -1).astype(np.int64)


def to_class_index(y_pm: Any) -> Any:
    """Map labels in {-1, +1} to class indices {0, 1} (int64; +1 -> 1), for training with 2 logits."""
    if isinstance(y_pm, torch.Tensor):
        if not bool(((y_pm == 1) | (y_pm == -1)).all()):
            raise ValueError("labels must all be -1 or +1")
        return (y_pm == 1).to(torch.int64)
    arr = np.asarray(y_pm)
    if not np.all((arr == 1) | (arr == -1)):
        raise ValueError("labels must all be -1 or +1")
    return (arr == 1).astype(np.int64)


def subsample(x: Any, y: Any, n: int, seed: int = 0, stratified: bool = True) -> tuple[Any, Any]:
    """A random subset of ``n`` examples without replacement, in the original order.

    ``stratified``: each class keeps its share of ``n`` (largest-remainder rounding).
    Works on torch tensors and numpy arrays; deterministic given ``seed``.
    """
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    total = len(y_np)
    if len(x) != total:
        raise ValueError(f"x has {len(x)} examples but y has {total}")
    if not isinstance(n, (int, np.integer)) or not 0 < n <= total:
        raise ValueError(f"n must be an int in 1..{total}, got {n!r}")
    rng = np.random.default_rng(seed)
    if not stratified:
        idx = rng.choice(total, size=int(n), replace=False)
    else:
        classes, counts = np.unique(y_np, return_counts=True)
        share = counts * (n / total)
        take = np.floor(share).astype(np.int64)
        remainder = int(n - take.sum())
        take[np.argsort(-(share - take), kind="stable")[:remainder]] += 1
        idx = np.concatenate([
            rng.choice(np.flatnonzero(y_np == c), size=int(k), replace=False) for c, k in zip(classes, take)
        ])
    idx = np.sort(idx)
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        t_idx = torch.from_numpy(idx)
        xs = x[t_idx.to(x.device)] if isinstance(x, torch.Tensor) else x[idx]
        ys = y[t_idx.to(y.device)] if isinstance(y, torch.Tensor) else y_np[idx]
        return xs, ys
    return x[idx], y_np[idx]


# --------------------------------------------------------------------------- synthetic data
def gaussian_blobs(
    n_per_class: int | Sequence[int],
    means: Sequence[Sequence[float]],
    std: float | Sequence[float],
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Two isotropic Gaussian classes: ``X`` float64 (n, d), ``y`` int64 in {-1, +1}.

    ``means[0]`` is the mean of class +1, ``means[1]`` of class -1; ``std`` is the standard
    deviation (one value, or one per class); ``n_per_class`` an int or (n_pos, n_neg).
    Rows are class +1 first. Example, Nar et al. 2019b, Fig 2: ``gaussian_blobs(10, [(2, 12), (40, 50)], 5.0)``
    (variance 25).
    """
    mu = np.asarray(means, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[0] != 2:
        raise ValueError(f"means must hold exactly two mean vectors (class +1, class -1), got shape {mu.shape}")
    counts = np.broadcast_to(np.asarray(n_per_class), (2,))
    stds = np.broadcast_to(np.asarray(std, dtype=np.float64), (2,))
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 1).any():
        raise ValueError(f"n_per_class must be positive ints, got {n_per_class!r}")
    if (stds < 0).any() or not np.isfinite(stds).all():
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    rng = np.random.default_rng(seed)
    X = np.concatenate([mu[k] + stds[k] * rng.standard_normal((int(counts[k]), mu.shape[1])) for k in range(2)])
    y = np.concatenate([np.ones(int(counts[0]), np.int64), -np.ones(int(counts[1]), np.int64)])
    return X, y


def two_point(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Pack the two-point problem of Nar et al. 2019b, §2 (``x`` in class +1, ``y`` in class -1) as (X (2, d), [+1, -1])."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"x and y must be 1-D vectors of the same length, got {a.shape} and {b.shape}")
    return np.stack([a, b]), np.array([1, -1], dtype=np.int64)


def affine_subspace_data(
    n: int, dim: int, subspace_dim: int, offset: float, gap: float, seed: int = 0, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linearly separable data on an affine subspace (setting of Nar et al. 2019a, Thm 1 / Nar et al. 2019b, Thm 2).

    Points are ``x = offset * v + U z`` with ``U`` (dim, subspace_dim) an orthonormal basis of the
    subspace's directions, ``v`` a unit vector orthogonal to it (so the subspace is at distance
    ``offset`` from the origin) and ``z ~ N(0, scale^2 I)`` except along a random unit direction
    ``u`` of the subspace, where the coordinate is ``y * (gap / 2 + |N(0, scale^2)|)``: the classes
    are separated with margin at least ``gap / 2`` by the hyperplane through the origin with normal
    ``U u`` (it contains the normal direction ``v``, so no bias is needed).
    First ``ceil(n/2)`` rows are class +1. Returns ``X`` float64 (n, dim), ``y`` int64 in {-1, +1},
    and ``U``. The point of the subspace closest to the origin is ``X[0] - U @ (U.T @ X[0])``.
    """
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not (1 <= subspace_dim <= dim):
        raise ValueError(f"need 1 <= subspace_dim <= dim, got subspace_dim={subspace_dim}, dim={dim}")
    if offset < 0 or gap < 0 or scale <= 0:
        raise ValueError(f"need offset >= 0, gap >= 0, scale > 0; got {offset}, {gap}, {scale}")
    if offset > 0 and subspace_dim == dim:
        raise ValueError("offset > 0 needs subspace_dim < dim (a direction normal to the subspace)")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, min(subspace_dim + 1, dim))))
    basis, normal = q[:, :subspace_dim], q[:, -1] if subspace_dim < dim else np.zeros(dim)
    u = rng.standard_normal(subspace_dim)
    u /= np.linalg.norm(u)
    y = np.where(np.arange(n) < (n + 1) // 2, 1, -1).astype(np.int64)
    z = scale * rng.standard_normal((n, subspace_dim))
    z -= np.outer(z @ u, u)  # replace the coordinate along u
    z += np.outer(y * (gap / 2 + scale * np.abs(rng.standard_normal(n))), u)
    X = offset * normal + z @ basis.T
    return X, y, basis


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m marginlab.data fetch NAME [--root DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m marginlab.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download datasets for offline use")
    p_fetch.add_argument("name", choices=("all",) + DATASETS)
    p_fetch.add_argument("--root", default=None, help="data root (default: $MARGINLAB_DATA or the user cache)")
    p_fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        folders = fetch(args.name, args.root, progress=False if args.no_progress else None)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for n, folder in folders.items():
        print(f"{n}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
