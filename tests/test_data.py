"""Tests for marginlab.data: real-file loading, downloads over loopback, errors, CLI, synthetic data."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from marginlab import data

REAL_ROOT = os.environ.get("MARGINLAB_DATA")
needs_real = pytest.mark.skipif(
    not REAL_ROOT or not Path(REAL_ROOT, "MNIST", "raw").is_dir(),
    reason="MARGINLAB_DATA is unset or lacks the real data subsets (point it at ../shared/data)",
)


# =========================================================================== real data (shared subsets)
def _raw_idx_bytes(path: Path) -> bytes:
    """Independent decoding: the uncompressed idx bytes, no numpy / marginlab involved."""
    with gzip.open(path, "rb") as f:
        return f.read()


@needs_real
def test_mnist_test_real():
    x, y = data.load("mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    raw = _raw_idx_bytes(Path(REAL_ROOT, "MNIST/raw/t10k-images-idx3-ubyte.gz"))
    golden = 2396707  # measured once: sum of the uint8 bytes of the first 100 official test images
    assert sum(raw[16:16 + 100 * 784]) == golden
    assert int(torch.round(x[:100] * 255).sum()) == golden
    # pixel order: row-major 28x28 exactly as in the file
    assert torch.equal(torch.round(x[3, 0] * 255).to(torch.uint8).flatten(),
                       torch.tensor(list(raw[16 + 3 * 784:16 + 4 * 784]), dtype=torch.uint8))


@needs_real
def test_mnist_train_subset_real():
    x, y = data.load("mnist", "train")
    assert x.shape == (3678, 1, 28, 28)
    assert torch.bincount(y).tolist() == [351, 410, 364, 364, 400, 327, 367, 395, 338, 362]
    golden = 2530887  # measured: byte sum of the first 100 training images of the subset file
    raw = _raw_idx_bytes(Path(REAL_ROOT, "MNIST/raw/train-images-idx3-ubyte.gz"))
    assert sum(raw[16:16 + 100 * 784]) == golden
    assert int(torch.round(x[:100] * 255).sum()) == golden
    x01, y01 = data.binary_subset(x, y, 1, 0)
    assert len(y01) == 761 and int((y01 == 1).sum()) == 410 and set(y01.tolist()) == {-1, 1}


@needs_real
def test_cifar10_real():
    xtr, ytr = data.load("cifar10", "train")
    xte, yte = data.load("cifar10", "test")
    assert xtr.shape == (5085, 3, 32, 32) and xte.shape == (1017, 3, 32, 32)
    for x in (xtr, xte):
        assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert (int((ytr == 0).sum()), int((ytr == 7).sum())) == (517, 516)
    assert (int((yte == 0).sum()), int((yte == 7).sum())) == (105, 102)
    # golden values measured from the raw pickles (independent decoding with the stdlib pickle)
    with open(Path(REAL_ROOT, "cifar-10-batches-py/test_batch"), "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert int(batch["data"][:10].astype(np.int64).sum()) == 3755088
    assert int(torch.round(xte[:10] * 255).sum()) == 3755088
    assert yte[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1] == batch["labels"][:10]
    # channel-major rows: red plane first, then green
    assert (torch.round(xte[0, 0, 0, :5] * 255)).tolist() == [158, 159, 165, 166, 160]
    assert (torch.round(xte[0, 1, 0, :5] * 255)).tolist() == [112, 111, 116, 118, 112]
    assert int(torch.round(xtr[-10:] * 255).sum()) == 4362434  # last images of data_batch_5: batch order

    xb, yb = data.binary_subset(xtr, ytr, "airplane", "horse")
    assert xb.shape == (1033, 3, 32, 32) and yb.dtype == torch.int64
    assert (int((yb == 1).sum()), int((yb == -1).sum())) == (517, 516)
    keep = (ytr == 0) | (ytr == 7)
    assert torch.equal(xb, xtr[keep])  # order kept
    xb, yb = data.binary_subset(xte, yte, "airplane", "horse")
    assert (int((yb == 1).sum()), int((yb == -1).sum())) == (105, 102)
    assert data.to_class_index(yb).tolist() == (yb == 1).long().tolist()


@needs_real
def test_cache_returns_fresh_copies():
    x1, y1 = data.load("mnist", "test")
    x1.fill_(7.0)
    y1.fill_(3)
    x2, y2 = data.load("mnist", "test")
    assert float(x2.max()) == 1.0 and torch.bincount(y2)[0] == 980
    assert data._decoded.cache_info().hits >= 1


@needs_real
def test_fetch_present_does_not_download(monkeypatch):
    monkeypatch.setitem(data.RESOURCES, "mnist", [(("http://127.0.0.1:9/",), "x", "0" * 32)])
    folders = data.fetch("mnist", REAL_ROOT)
    assert folders == {"mnist": Path(REAL_ROOT, "MNIST/raw")}


# =========================================================================== fake files written by the tests
def _idx_gz(arr: np.ndarray, magic: int, count: int | None = None) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in ((count if count is not None else arr.shape[0]), *arr.shape[1:])
    )
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def _mnist_files(n_train=12, n_test=7, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test)),
    }
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img, lab = arrays[split]
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx_gz(img, 0x803)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx_gz(lab, 0x801)
    return files, arrays


def _cifar_batch(n, rng, label_keys=("labels",), n_classes=(10,)):
    d = {"batch_label": "fake", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         "filenames": [f"img_{i}.png" for i in range(n)]}
    for key, k in zip(label_keys, n_classes):
        d[key] = rng.integers(0, k, n).tolist()
    return d


def _tar_gz(folder: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _fake_cifar10(n=4, seed=0):
    """A tiny cifar-10-python.tar.gz in the official layout; returns (archive bytes, expected arrays)."""
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": _cifar_batch(n, rng) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n + 1, rng)
    members = {k: pickle.dumps(v, protocol=2) for k, v in batches.items()}
    members["batches.meta"] = pickle.dumps({"label_names": list(data.CIFAR10_CLASSES)}, protocol=2)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    expected = {
        "train": (np.concatenate([b["data"] for b in train]), np.concatenate([b["labels"] for b in train])),
        "test": (batches["test_batch"]["data"], np.array(batches["test_batch"]["labels"])),
    }
    return _tar_gz("cifar-10-batches-py", members), expected


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _assert_images(x: torch.Tensor, raw_rows: np.ndarray, shape):
    assert x.shape == shape and x.dtype == torch.float32
    np.testing.assert_array_equal(np.round(x.numpy() * 255).astype(np.uint8).reshape(len(raw_rows), -1),
                                  raw_rows.reshape(len(raw_rows), -1))


# =========================================================================== loopback HTTP server
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        body = srv.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if srv.ranges and rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if srv.ranges:
            self.send_header("Accept-Ranges", "bytes")
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path.lstrip("/") in srv.interrupt:  # send half the body, then drop the connection
            srv.interrupt.discard(self.path.lstrip("/"))
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.log, httpd.interrupt, httpd.ranges = {}, [], set(), True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "MARGINLAB_MIRROR", "MARGINLAB_CHECKSUMS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("CI", "1")  # no progress bars


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def _serve_cifar10(server, monkeypatch, md5=None, n=4):
    archive, expected = _fake_cifar10(n=n)
    server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(data.RESOURCES, "cifar10",
                        [((server.url,), "cifar-10-python.tar.gz", md5 or _md5(archive))])
    return archive, expected


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# =========================================================================== downloads
def test_cifar10_download_loopback(server, monkeypatch, tmp_path):
    archive, expected = _serve_cifar10(server, monkeypatch)
    root = tmp_path / "data"
    x, y = data.load("cifar10", "train", root=root)
    _assert_images(x, expected["train"][0], (20, 3, 32, 32))
    assert y.dtype == torch.int64 and y.tolist() == expected["train"][1].tolist()
    xt, yt = data.load("cifar10", "test", root=root)
    _assert_images(xt, expected["test"][0], (5, 3, 32, 32))
    assert yt.tolist() == expected["test"][1].tolist()
    assert len(server.log) == 1  # one download for both splits
    assert _md5((root / "cifar-10-python.tar.gz").read_bytes()) == _md5(archive)
    assert not [p for p in _leftovers(root) if p.endswith(".part") or ".extract-" in p]


def test_checksum_mismatch_leaves_nothing(server, monkeypatch, tmp_path):
    _serve_cifar10(server, monkeypatch, md5="0" * 32)
    root = tmp_path / "data"
    with pytest.raises(data.ChecksumError, match=r"checksum mismatch for cifar-10-python\.tar\.gz"):
        data.load("cifar10", "train", root=root)
    assert _leftovers(tmp_path) == []  # no .part, no archive, no extracted folder, no empty dirs
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError, match="checksum"):
        data.fetch("cifar10", existing)
    assert _leftovers(existing) == []


def test_interrupted_download_resumes_with_range(server, monkeypatch, tmp_path):
    archive, expected = _serve_cifar10(server, monkeypatch)
    server.interrupt.add("cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(data.DownloadError, match="resumes"):
        data.load("cifar10", "test", root=root)
    part = root / "cifar-10-python.tar.gz.part"
    assert part.is_file() and part.stat().st_size == len(archive) // 2  # kept: the server takes ranges
    assert not (root / "cifar-10-batches-py").exists()
    x, y = data.load("cifar10", "test", root=root)
    assert server.log[-1] == ("/cifar-10-python.tar.gz", f"bytes={len(archive) // 2}-")
    _assert_images(x, expected["test"][0], (5, 3, 32, 32))
    assert y.tolist() == expected["test"][1].tolist()
    assert not part.exists()


def test_interrupted_download_without_ranges_restarts(server, monkeypatch, tmp_path):
    archive, expected = _serve_cifar10(server, monkeypatch)
    server.ranges = False
    server.interrupt.add("cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(data.DownloadError):
        data.load("cifar10", "train", root=root)
    assert _leftovers(tmp_path) == []  # not resumable -> the partial file is gone
    x, _ = data.load("cifar10", "train", root=root)
    assert [rng for _, rng in server.log] == [None, None]
    _assert_images(x, expected["train"][0], (20, 3, 32, 32))


def test_stale_partial_file_gets_clean_retry(server, monkeypatch, tmp_path):
    archive, expected = _serve_cifar10(server, monkeypatch)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz.part").write_bytes(b"junk from another file" * 10)
    x, _ = data.load("cifar10", "test", root=root)  # resumed -> bad md5 -> full restart
    assert [rng is not None for _, rng in server.log] == [True, False]
    _assert_images(x, expected["test"][0], (5, 3, 32, 32))
    assert not (root / "cifar-10-python.tar.gz.part").exists()


def test_offline_error_is_clear(monkeypatch, tmp_path):
    dead = _closed_port_url()
    monkeypatch.setitem(data.RESOURCES, "cifar10", [((dead,), "cifar-10-python.tar.gz", "0" * 32)])
    root = tmp_path / "data"
    with pytest.raises(RuntimeError) as err:
        data.load("cifar10", root=root)
    msg = str(err.value)
    for needle in ("cifar-10-python.tar.gz", dead + "cifar-10-python.tar.gz", "MARGINLAB_DATA", "data_batch_1",
                   "test_batch"):
        assert needle in msg
    assert _leftovers(tmp_path) == []
    monkeypatch.setitem(data.RESOURCES, "mnist",
                        [((dead,), f, "0" * 32) for _, f, _ in data.RESOURCES["mnist"]])
    with pytest.raises(RuntimeError) as err:
        data.load("mnist", "test", root=root)
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
              "MARGINLAB_DATA", dead):
        assert f in str(err.value)
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="MARGINLAB_DATA"):
        data.load("mnist", "test", root=root, download=False)


def test_mnist_download_loopback_with_mirror_fallback(server, monkeypatch, tmp_path):
    files, arrays = _mnist_files()
    server.files.update(files)
    dead = _closed_port_url()
    monkeypatch.setitem(data.RESOURCES, "mnist",
                        [((dead, server.url), name, _md5(b)) for name, b in files.items()])
    root = tmp_path / "data"
    x, y = data.load("mnist", "test", root=root)
    _assert_images(x, arrays["test"][0], (7, 1, 28, 28))
    assert y.tolist() == arrays["test"][1].tolist()
    x, y = data.load("mnist", "train", root=root)
    _assert_images(x, arrays["train"][0], (12, 1, 28, 28))
    assert sorted(p.name for p in (root / "MNIST/raw").iterdir()) == sorted(files)
    assert len(server.log) == 4


def test_cifar100_download_fine_and_coarse(server, monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    keys, ks = ("fine_labels", "coarse_labels"), (100, 20)
    train, test = _cifar_batch(6, rng, keys, ks), _cifar_batch(3, rng, keys, ks)
    archive = _tar_gz("cifar-100-python", {"train": pickle.dumps(train, protocol=2),
                                           "test": pickle.dumps(test, protocol=2),
                                           "meta": pickle.dumps({}, protocol=2)})
    server.files["cifar-100-python.tar.gz"] = archive
    monkeypatch.setitem(data.RESOURCES, "cifar100", [((server.url,), "cifar-100-python.tar.gz", _md5(archive))])
    x, y = data.load("cifar100", "train", root=tmp_path)
    _assert_images(x, train["data"], (6, 3, 32, 32))
    assert y.tolist() == train["fine_labels"]
    _, yc = data.load("cifar100", "test", root=tmp_path, label_type="coarse")
    assert yc.tolist() == test["coarse_labels"]
    with pytest.raises(ValueError, match="label_type"):
        data.load("cifar100", root=tmp_path, label_type="medium")


def test_unsafe_archive_rejected(server, monkeypatch, tmp_path):
    archive = _tar_gz("cifar-10-batches-py/../..", {"evil": b"x"})
    server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(data.RESOURCES, "cifar10", [((server.url,), "cifar-10-python.tar.gz", _md5(archive))])
    with pytest.raises(ValueError, match="unsafe path"):
        data.load("cifar10", root=tmp_path / "data")
    assert not (tmp_path / "evil").exists()
    assert not [p for p in _leftovers(tmp_path) if ".extract-" in p or "batches" in p]


# =========================================================================== CLI (subprocess, env overrides)
def _cli(args, env_extra):
    env = {**os.environ, **env_extra, "CI": "1", "no_proxy": "127.0.0.1,localhost"}
    for var in ("http_proxy", "HTTP_PROXY", "MARGINLAB_MIRROR", "MARGINLAB_CHECKSUMS"):
        if var not in env_extra:
            env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "marginlab.data", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_fetch_cifar10(server, monkeypatch, tmp_path, capsys):
    archive, expected = _fake_cifar10(n=3)
    server.files["cifar-10-python.tar.gz"] = archive
    root = tmp_path / "root"
    # in-process: MARGINLAB_MIRROR redirects the official URL; the fake archive does not match the
    # official md5, so the CLI must refuse it (exit 1, clear message) and leave nothing behind
    monkeypatch.setenv("MARGINLAB_MIRROR", server.url)
    assert data.main(["fetch", "cifar10", "--root", str(root)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []
    with pytest.raises(SystemExit) as exc:
        data.main(["fetch", "imagenet"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    # a real subprocess (monkeypatching cannot cross it): mirror + checksum manifest from the environment
    sums = tmp_path / "sums.json"
    sums.write_text(json.dumps({"cifar-10-python.tar.gz": _md5(archive)}))
    ok = _cli(["fetch", "cifar10", "--root", str(root)],
              {"MARGINLAB_MIRROR": server.url, "MARGINLAB_CHECKSUMS": str(sums)})
    assert ok.returncode == 0, ok.stderr
    assert f"cifar10: {root / 'cifar-10-batches-py'}" in ok.stdout
    x, y = data.load("cifar10", "test", root=root, download=False)
    _assert_images(x, expected["test"][0], (4, 3, 32, 32))
    assert y.tolist() == expected["test"][1].tolist()


# =========================================================================== bad input and corrupted files
def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10, cifar100"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="train, test"):
        data.load("mnist", split="validation")
    with pytest.raises(ValueError, match="valid names"):
        data.fetch("svhn")


def _write_cifar_dir(root: Path, n=2) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(n, rng), protocol=2))
    return folder


def test_corrupted_pickle(tmp_path):
    folder = _write_cifar_dir(tmp_path)
    x, _ = data.load("cifar10", "train", root=tmp_path, download=False)
    assert x.shape == (10, 3, 32, 32)
    # fixed garbage (os.urandom made this test fail by chance: a random FRAME opcode with a huge length
    # raised OverflowError), plus that very case
    garbage = [random.Random(seed).randbytes(200) for seed in range(20)]
    garbage.append(b"\x80\x04\x95" + b"\xff" * 8 + b"junk")
    for blob in garbage:
        (folder / "data_batch_3").write_bytes(blob)
        data.clear_cache()
        with pytest.raises(ValueError, match="data_batch_3"):
            data.load("cifar10", "train", root=tmp_path, download=False)
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="test_batch.*corrupted or truncated"):
        data.load("cifar10", "test", root=tmp_path, download=False)


def test_pickle_with_foreign_global_is_refused(tmp_path):
    folder = _write_cifar_dir(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load global"):
        data.load("cifar10", "test", root=tmp_path, download=False)
    assert not marker.exists()


def test_corrupted_idx_files(tmp_path):
    files, _ = _mnist_files(n_train=5, n_test=4)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, b in files.items():
        (raw / name).write_bytes(b)
    assert data.load("mnist", "test", root=tmp_path, download=False)[0].shape == (4, 1, 28, 28)
    img = np.zeros((4, 28, 28), np.uint8)
    # header says 5 images, data holds 4
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(_idx_gz(img, 0x803, count=5))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        data.load("mnist", "test", root=tmp_path, download=False)
    # header says 3 images, data holds 4 (trailing bytes)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(_idx_gz(img, 0x803, count=3))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*announces"):
        data.load("mnist", "test", root=tmp_path, download=False)
    # truncated gzip stream
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(files["t10k-images-idx3-ubyte.gz"][:-40])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz"):
        data.load("mnist", "test", root=tmp_path, download=False)
    # wrong magic (a labels file where images are expected)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"])
    with pytest.raises(ValueError, match="magic"):
        data.load("mnist", "test", root=tmp_path, download=False)
    # image/label count mismatch
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(_idx_gz(np.zeros((3, 28, 28), np.uint8), 0x803))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        data.load("mnist", "test", root=tmp_path, download=False)


# =========================================================================== subsets and label helpers
def test_binary_subset_numpy_and_errors():
    x = np.arange(8)[:, None] * np.ones((1, 3))
    y = np.array([0, 7, 1, 7, 0, 2, 7, 0])
    xb, yb = data.binary_subset(x, y, "horse", 0)
    assert xb[:, 0].tolist() == [0, 1, 3, 4, 6, 7] and yb.tolist() == [-1, 1, 1, -1, 1, -1]
    assert yb.dtype == np.int64
    with pytest.raises(ValueError, match="does not occur"):
        data.binary_subset(x, y, "ship", "horse")
    with pytest.raises(ValueError, match="same class"):
        data.binary_subset(x, y, 7, "horse")
    with pytest.raises(ValueError, match="not a CIFAR-10 class"):
        data.binary_subset(x, y, "zebra", 0)
    with pytest.raises(ValueError, match="does not occur"):
        data.binary_subset(torch.tensor(x), torch.tensor(y), 0, 9)
    assert data.to_class_index(np.array([1, -1, 1])).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"-1 or \+1"):
        data.to_class_index(torch.tensor([0, 1]))


def test_subsample():
    y = np.repeat([0, 1, 2], [60, 30, 10])
    x = torch.arange(100)
    xs, ys = data.subsample(x, torch.tensor(y), 20, seed=3)
    assert torch.bincount(ys).tolist() == [12, 6, 2]
    assert torch.all(xs[1:] > xs[:-1]) and torch.equal(ys, torch.tensor(y)[xs])  # order kept, pairs aligned
    xs2, _ = data.subsample(x, torch.tensor(y), 20, seed=3)
    assert torch.equal(xs, xs2)
    assert not torch.equal(xs, data.subsample(x, torch.tensor(y), 20, seed=4)[0])
    xn, yn = data.subsample(np.arange(100), y, 10, seed=0, stratified=False)
    assert len(xn) == 10 and len(set(xn.tolist())) == 10 and (yn == y[xn]).all()
    with pytest.raises(ValueError, match="n must be"):
        data.subsample(x, y, 101, seed=0)


# =========================================================================== synthetic generators
def test_gaussian_blobs():
    X, y = data.gaussian_blobs(10, [(2, 12), (40, 50)], 5.0, seed=0)
    assert X.shape == (20, 2) and X.dtype == np.float64 and y.tolist() == [1] * 10 + [-1] * 10
    X2, _ = data.gaussian_blobs(10, [(2, 12), (40, 50)], 5.0, seed=0)
    np.testing.assert_array_equal(X, X2)
    assert not np.array_equal(X, data.gaussian_blobs(10, [(2, 12), (40, 50)], 5.0, seed=1)[0])
    Xb, yb = data.gaussian_blobs((4000, 1000), [(0, 0, 0), (3, 3, 3)], (1.0, 0.5), seed=0)
    assert (yb == 1).sum() == 4000 and (yb == -1).sum() == 1000
    np.testing.assert_allclose(Xb[yb == 1].mean(0), 0, atol=0.06)
    np.testing.assert_allclose(Xb[yb == -1].std(0), 0.5, atol=0.03)
    with pytest.raises(ValueError, match="two mean"):
        data.gaussian_blobs(3, [(0, 0)], 1.0)
    with pytest.raises(ValueError, match="std"):
        data.gaussian_blobs(3, [(0, 0), (1, 1)], -1.0)


def test_two_point():
    X, y = data.two_point([1.0, 2.0], [3, -1])
    assert X.tolist() == [[1, 2], [3, -1]] and y.tolist() == [1, -1] and X.dtype == np.float64
    with pytest.raises(ValueError):
        data.two_point([1, 2], [1, 2, 3])


def test_affine_subspace_data():
    from scipy.optimize import minimize

    X, y, U = data.affine_subspace_data(40, 6, 3, offset=5.0, gap=1.0, seed=0)
    assert X.shape == (40, 6) and U.shape == (6, 3) and set(y.tolist()) == {-1, 1} and y.sum() == 0
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    anchors = X - (X @ U) @ U.T  # component normal to the subspace's directions: the same for every point
    np.testing.assert_allclose(anchors, np.broadcast_to(anchors[0], X.shape), atol=1e-10)
    assert np.linalg.norm(anchors[0]) == pytest.approx(5.0)
    # hard-margin SVM through the origin (min ||w||^2 s.t. y w.x >= 1) has margin >= gap / 2
    cons = {"type": "ineq", "fun": lambda w: y * (X @ w) - 1, "jac": lambda w: y[:, None] * X}
    res = minimize(lambda w: w @ w, np.zeros(6), jac=lambda w: 2 * w, constraints=[cons], method="SLSQP")
    assert res.success and np.all(y * (X @ res.x) >= 1 - 1e-6)
    assert 1 / np.linalg.norm(res.x) >= 0.5 - 1e-6
    X2, y2, U2 = data.affine_subspace_data(40, 6, 3, offset=5.0, gap=1.0, seed=0)
    np.testing.assert_array_equal(X, X2)
    with pytest.raises(ValueError, match="subspace_dim"):
        data.affine_subspace_data(10, 3, 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="offset > 0"):
        data.affine_subspace_data(10, 3, 3, 1.0, 1.0)


# =========================================================================== profiles: data sizes and provenance
@pytest.fixture
def full_profile(monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    monkeypatch.delenv("MARGINLAB_SMOKE", raising=False)
    data.reset_loaded_sizes()
    yield
    data.reset_loaded_sizes()


@needs_real
def test_full_profile_refuses_the_offline_subsets_with_one_message(full_profile):
    with pytest.raises(data.DataSizeError) as err:
        data.require("mnist", "cifar10", download=False)
    msg = str(err.value)
    for needle in ("mnist train: 3,678 examples, the full set has 60,000", "train-images-idx3-ubyte.gz",
                   "cifar10 train: 5,085 examples, the full set has 50,000", "data_batch_1",
                   "cifar10 test: 1,017 examples, the full set has 10,000", "test_batch",
                   "python -m marginlab.data fetch all", "MARGINLAB_DATA"):
        assert needle in msg, (needle, msg)
    assert "mnist test" not in msg  # the official test set is complete
    # load() itself refuses too (a chapter that forgot require() cannot write results/full/)
    with pytest.raises(data.DataSizeError, match="60,000"):
        data.load("mnist", "train")
    x, _ = data.load("mnist", "test")  # complete: fine
    assert len(x) == 10_000
    assert data.loaded_sizes()["mnist"]["test"] == 10_000 and "train" not in data.loaded_sizes()["mnist"]


def test_full_profile_missing_data_is_downloaded_or_named(full_profile, server, monkeypatch, tmp_path):
    monkeypatch.setitem(data.FULL_SIZES, "cifar10", {"train": 20, "test": 5})
    _serve_cifar10(server, monkeypatch, n=4)  # 5 batches of 4 = 20 training images, 5 test images
    root = tmp_path / "data"
    assert data.require("cifar10", root=root) == {"cifar10": {"train": 20, "test": 5}}
    assert len(server.log) == 1
    # present but short: never overwritten, one message naming what is short and what is missing
    monkeypatch.setitem(data.FULL_SIZES, "cifar10", {"train": 21, "test": 5})
    monkeypatch.setitem(data.RESOURCES, "mnist", [((server.url,), f, "0" * 32) for _, f, _ in data.RESOURCES["mnist"]])
    with pytest.raises(data.DataSizeError) as err:
        data.require("cifar10", "mnist", root=root)
    msg = str(err.value)
    assert "cifar10 train: 20 examples, the full set has 21" in msg and "cifar10 test" not in msg
    assert "mnist: missing" in msg and "train-images-idx3-ubyte.gz" in msg and "download failed" in msg
    assert "python -m marginlab.data fetch all" in msg
    assert len(server.log) == 2  # the CIFAR-10 archive was not fetched again; one failed MNIST request


def test_quick_and_standard_do_not_check_sizes(monkeypatch, tmp_path):
    for profile in ("quick", "standard"):
        monkeypatch.setenv("MARGINLAB_PROFILE", profile)
        assert data.require("mnist", "cifar100", root=tmp_path / "nothing") == {}
    with pytest.raises(ValueError, match="unknown dataset"):
        data.require("svhn")
    with pytest.raises(ValueError, match="profile"):
        data.require("mnist", profile="huge")


@needs_real
def test_smoke_stands_in_cifar100_and_records_it(monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    monkeypatch.setenv("MARGINLAB_SMOKE", "1")
    monkeypatch.setattr(data, "_STANDINS", {})
    data.reset_loaded_sizes()
    assert data.require("mnist", "cifar10", "cifar100") == {}  # subsets are fine at toy sizes
    x, y = data.load("cifar100", "test")
    x10, y10 = data.load("cifar10", "test")
    assert torch.equal(x, x10) and int(y.min()) >= 0 and int(y.max()) <= 99
    assert len(torch.unique(y)) == 100 and torch.equal(y // 10, y10)
    _, yc = data.load("cifar100", "test", label_type="coarse")
    assert int(yc.max()) <= 19 and len(torch.unique(yc)) == 20
    sizes = data.loaded_sizes()
    assert sizes["cifar100"]["test"] == len(x) and sizes["cifar100"]["standin"] == data.CIFAR100_STANDIN
    assert sizes["cifar10"]["test"] == len(x10) and "standin" not in sizes["cifar10"]
    # outside a smoke run the stand-in is never used
    monkeypatch.setenv("MARGINLAB_SMOKE", "0")
    monkeypatch.setenv("MARGINLAB_PROFILE", "quick")
    with pytest.raises(FileNotFoundError, match="cifar100"):
        data.load("cifar100", "test", download=False)
    data.reset_loaded_sizes()


@needs_real
def test_loaded_sizes_records_what_load_returned(monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "quick")
    data.reset_loaded_sizes()
    x, _ = data.load("mnist")
    rec = data.loaded_sizes()
    assert rec["mnist"]["train"] == len(x) == 3678 and rec["mnist"]["files"]["train"][0].endswith(".gz")
    rec["mnist"]["train"] = 0  # a copy
    assert data.loaded_sizes()["mnist"]["train"] == 3678
    data.reset_loaded_sizes()
    assert data.loaded_sizes() == {}
