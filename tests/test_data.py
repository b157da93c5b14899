"""IDX files, data roots, the checksummed downloader (against a local HTTP server), splits, CLI."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vaebench import data
from vaebench.cli import main
from vaebench.data import (
    DATA_ENV,
    DataError,
    ensure_files,
    load_arrays,
    load_splits,
    read_idx,
    read_pair,
    resolve_root,
    split_training_images,
)
from vaebench.spec.config import DataConfig

IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "train-labels-idx1-ubyte.gz"
CPU = torch.device("cpu")


def idx_bytes(
    array: np.ndarray, type_code: int = 0x08, shape: tuple[int, ...] | None = None
) -> bytes:
    """An IDX file by hand: magic (0, 0, type, ndim), big-endian dims, then the data."""
    shape = array.shape if shape is None else shape
    header = struct.pack(">BBBB", 0, 0, type_code, len(shape))
    header += struct.pack(f">{len(shape)}I", *shape)
    return header + array.tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))
    return path


def md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


def sample_images(count: int = 3, rows: int = 4, cols: int = 5) -> np.ndarray:
    return (np.arange(count * rows * cols, dtype=np.uint16) * 7 % 256).astype(np.uint8).reshape(
        count, rows, cols
    )


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# read_idx / read_pair


def test_read_idx_gzipped_images_and_labels(tmp_path: Path) -> None:
    images = sample_images()
    labels = np.array([7, 0, 9], dtype=np.uint8)
    images_path = write_gz(tmp_path / IMAGES, idx_bytes(images))
    labels_path = write_gz(tmp_path / LABELS, idx_bytes(labels))

    got = read_idx(images_path)
    assert got.shape == (3, 4, 5)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)

    got_labels = read_idx(labels_path)
    assert got_labels.shape == (3,)
    assert got_labels.dtype == np.uint8
    assert got_labels.tolist() == [7, 0, 9]

    pair_images, pair_labels = read_pair(images_path, labels_path)
    np.testing.assert_array_equal(pair_images, images)
    np.testing.assert_array_equal(pair_labels, labels)


def test_read_idx_uncompressed_file(tmp_path: Path) -> None:
    images = sample_images(2, 3, 3)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images))
    got = read_idx(path)
    assert got.shape == (2, 3, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([[1, -2], [300000, 4]], dtype=">i4")
    path = write_gz(tmp_path / "ints.gz", idx_bytes(values, type_code=0x0C))
    got = read_idx(path)
    assert got.shape == (2, 2)
    assert got.tolist() == [[1, -2], [300000, 4]]


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    whole = gzip.compress(idx_bytes(sample_images(20, 28, 28)))
    path = tmp_path / IMAGES
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_not_gzip_at_all_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / IMAGES
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_wrong_magic_number_names_the_file(tmp_path: Path) -> None:
    payload = bytearray(idx_bytes(sample_images()))
    payload[0] = 0x1F  # first magic byte must be 0
    path = write_gz(tmp_path / IMAGES, bytes(payload))
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "magic" in str(info.value)


def test_unknown_type_code_is_bad_magic(tmp_path: Path) -> None:
    path = write_gz(tmp_path / IMAGES, idx_bytes(sample_images(), type_code=0x42))
    with pytest.raises(DataError, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("shape", [(4, 4, 5), (2, 4, 5)], ids=["too-short", "too-long"])
def test_data_length_not_matching_header_names_the_file(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    path = write_gz(tmp_path / IMAGES, idx_bytes(sample_images(3, 4, 5), shape=shape))
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert str(shape) in message


def test_truncated_header_names_the_file(tmp_path: Path) -> None:
    path = write_gz(tmp_path / IMAGES, struct.pack(">BBBB", 0, 0, 8, 3) + b"\0\0\0\3")
    with pytest.raises(DataError, match="header") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_pair_count_mismatch_names_the_files(tmp_path: Path) -> None:
    images_path = write_gz(tmp_path / IMAGES, idx_bytes(sample_images(3)))
    labels_path = write_gz(tmp_path / LABELS, idx_bytes(np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(DataError) as info:
        read_pair(images_path, labels_path)
    message = str(info.value)
    assert str(images_path) in message
    assert LABELS in message
    assert "3 images" in message and "2 labels" in message


def test_read_pair_wrong_ranks(tmp_path: Path) -> None:
    flat = write_gz(tmp_path / "flat.gz", idx_bytes(np.zeros(6, dtype=np.uint8)))
    labels = write_gz(tmp_path / LABELS, idx_bytes(np.zeros(6, dtype=np.uint8)))
    with pytest.raises(DataError) as info:
        read_pair(flat, labels)
    assert str(flat) in str(info.value)
    images = write_gz(tmp_path / IMAGES, idx_bytes(sample_images(2)))
    square = write_gz(tmp_path / "square.gz", idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    with pytest.raises(DataError) as info:
        read_pair(images, square)
    assert str(square) in str(info.value)


# ---------------------------------------------------------------------------
# resolve_root


def test_resolve_root_prefers_the_explicit_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "from-env"))
    monkeypatch.chdir(tmp_path)
    assert resolve_root(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert resolve_root(str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()


def test_resolve_root_uses_the_environment_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "from-env"))
    monkeypatch.chdir(tmp_path)
    assert resolve_root() == (tmp_path / "from-env").resolve()
    assert resolve_root(None) == (tmp_path / "from-env").resolve()


def test_resolve_root_falls_back_to_cwd_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    root = resolve_root()
    assert root == (tmp_path / "data").resolve()
    assert root.is_absolute()


def test_resolve_root_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_root("~/mnist") == (tmp_path / "mnist").resolve()


# ---------------------------------------------------------------------------
# downloading from a local HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@dataclasses.dataclass
class Server:
    url: str
    folder: Path
    requests: list[str]

    def serve(self, relative: str, payload: bytes) -> str:
        """Put ``payload`` at ``relative`` under the served folder; return its md5."""
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        return md5(payload)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}/", folder, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def good_gz() -> bytes:
    return gzip.compress(idx_bytes(np.array([1, 2, 3], dtype=np.uint8)))


def raw_folder(root: Path) -> Path:
    return root / "MNIST" / "raw"


def leftovers(root: Path) -> list[str]:
    """Names of everything (hidden .part files included) in the raw folder, if it exists."""
    folder = raw_folder(root)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_good_file(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_gz: bytes
) -> None:
    monkeypatch.setitem(data.DATASETS["mnist"].md5, LABELS, server.serve(LABELS, good_gz))
    root = tmp_path / "root"
    paths = ensure_files("mnist", root, [LABELS], mirrors=[server.url])
    target = raw_folder(root) / LABELS
    assert paths == {LABELS: target}
    assert target.read_bytes() == good_gz
    assert sorted(p.name for p in raw_folder(root).iterdir()) == [LABELS]
    assert not list(raw_folder(root).glob("*.part"))
    assert server.requests == [f"/{LABELS}"]
    assert read_idx(target).tolist() == [1, 2, 3]


def test_download_checksum_mismatch_leaves_nothing(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_gz: bytes
) -> None:
    monkeypatch.setitem(data.DATASETS["mnist"].md5, LABELS, md5(good_gz))
    server.serve(LABELS, good_gz[:-8] + b"corrupt!")
    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        ensure_files("mnist", root, [LABELS], mirrors=[server.url])
    message = str(info.value)
    assert "checksum" in message
    assert LABELS in message
    assert leftovers(root) == []


def test_download_file_checksum_mismatch_directly(
    server: Server, tmp_path: Path, good_gz: bytes
) -> None:
    server.serve(LABELS, good_gz)
    target = tmp_path / "out" / LABELS
    with pytest.raises(DataError, match="checksum mismatch") as info:
        data.download_file(server.url + LABELS, target, "0" * 32)
    assert md5(good_gz) in str(info.value)
    assert list(target.parent.iterdir()) == []


def test_download_falls_back_to_second_mirror(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_gz: bytes
) -> None:
    monkeypatch.setitem(
        data.DATASETS["mnist"].md5, LABELS, server.serve(f"second/{LABELS}", good_gz)
    )
    root = tmp_path / "root"
    mirrors = [server.url + "first/", server.url + "second/"]
    paths = ensure_files("mnist", root, [LABELS], mirrors=mirrors)
    assert paths[LABELS].read_bytes() == good_gz
    assert server.requests == [f"/first/{LABELS}", f"/second/{LABELS}"]
    assert sorted(p.name for p in raw_folder(root).iterdir()) == [LABELS]


def test_unreachable_mirror_explains_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        ensure_files(
            "mnist", root, [IMAGES, LABELS], mirrors=[f"http://127.0.0.1:{closed_port()}/"]
        )
    message = str(info.value)
    assert IMAGES in message and LABELS in message
    assert str(raw_folder(root)) in message
    assert "VAEBENCH_DATA" in message
    assert "--data-root" in message
    assert "\n" not in message
    assert leftovers(root) == []


def test_unreachable_mirror_failures_list_every_mirror(
    server: Server, tmp_path: Path
) -> None:
    # three explicit mirrors (more than the dataset's two defaults): every one is named
    port = closed_port()
    mirrors = [f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/", server.url + "c/"]
    with pytest.raises(DataError) as info:
        ensure_files("mnist", tmp_path / "root", [LABELS], mirrors=mirrors)
    message = str(info.value)
    for mirror in mirrors:
        assert mirror + LABELS in message, (mirror, message)


def test_existing_file_is_never_overwritten(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_gz: bytes
) -> None:
    monkeypatch.setitem(data.DATASETS["mnist"].md5, LABELS, server.serve(LABELS, good_gz))
    root = tmp_path / "root"
    existing = raw_folder(root) / LABELS
    write_gz(existing, idx_bytes(np.array([9, 9], dtype=np.uint8)))  # md5 differs from the server's
    os.utime(existing, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before_bytes, before_mtime = existing.read_bytes(), existing.stat().st_mtime_ns
    assert md5(before_bytes) != md5(good_gz)

    paths = ensure_files("mnist", root, [LABELS], mirrors=[server.url])
    assert paths == {LABELS: existing}
    assert existing.read_bytes() == before_bytes
    assert existing.stat().st_mtime_ns == before_mtime
    assert server.requests == []
    assert sorted(p.name for p in raw_folder(root).iterdir()) == [LABELS]


def test_extracted_file_is_used_instead_of_downloading(
    server: Server, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    extracted = raw_folder(root) / LABELS.removesuffix(".gz")
    extracted.parent.mkdir(parents=True)
    extracted.write_bytes(idx_bytes(np.array([4, 5], dtype=np.uint8)))
    paths = ensure_files("mnist", root, [LABELS], mirrors=[server.url])
    assert paths == {LABELS: extracted}
    assert server.requests == []
    assert read_idx(paths[LABELS]).tolist() == [4, 5]


BROKEN_REPLIES = {
    # a mirror URL that points at something that is not an HTTP server
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    # an HTTP server that dies in the middle of a chunked body
    "truncated-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nabc",
}


@pytest.fixture(params=list(BROKEN_REPLIES), ids=list(BROKEN_REPLIES))
def broken_mirror(request: pytest.FixtureRequest) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that answers every connection with a broken reply."""
    reply = BROKEN_REPLIES[request.param]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_broken_mirror_falls_back_to_the_next(
    broken_mirror: str,
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    good_gz: bytes,
) -> None:
    monkeypatch.setitem(data.DATASETS["mnist"].md5, LABELS, server.serve(LABELS, good_gz))
    root = tmp_path / "root"
    paths = ensure_files("mnist", root, [LABELS], mirrors=[broken_mirror, server.url])
    assert paths[LABELS].read_bytes() == good_gz
    assert leftovers(root) == [LABELS]


def test_broken_only_mirror_is_a_data_error(broken_mirror: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        ensure_files("mnist", root, [LABELS], mirrors=[broken_mirror])
    assert broken_mirror + LABELS in str(info.value)
    assert leftovers(root) == []


# ---------------------------------------------------------------------------
# load_splits on real MNIST


def test_load_splits_subset(mnist_root: Path) -> None:
    splits = load_splits(DataConfig(subset=500), mnist_root, CPU)
    train, test = splits.train, splits.test
    assert train.images.shape == (500, 1, 28, 28)
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    assert float(train.images.max()) == 1.0  # 255 -> 1.0
    assert train.labels.shape == (500,) and train.labels.dtype == torch.int64
    assert set(train.labels.tolist()) == set(range(10))
    assert len(train) == 500
    assert test.images.shape == (10000, 1, 28, 28) and len(test) == 10000
    assert test.labels.dtype == torch.int64
    assert splits.image_shape == (1, 28, 28)
    assert splits.dynamic_binarize is False
    # greyscale: more than two distinct pixel values
    assert torch.unique(train.images).numel() > 2
    # the subset is the first N images, in file order, of what validation leaves
    full = load_splits(DataConfig(), mnist_root, CPU)
    assert len(full.train) == 50000 and len(full.validation) == 10000
    assert torch.equal(full.train.images[:500], train.images)
    assert torch.equal(full.train.labels[:500], train.labels)
    everything = load_splits(DataConfig(validation=0), mnist_root, CPU)
    assert len(everything.train) == 60000 and everything.validation is None


def test_validation_is_the_last_training_images_whatever_the_subset_and_seed(
    mnist_root: Path,
) -> None:
    images, labels = load_arrays("mnist", mnist_root)["train"]
    small = load_splits(DataConfig(subset=500, validation=2000), mnist_root, CPU)
    large = load_splits(DataConfig(validation=2000), mnist_root, CPU)
    expected = torch.from_numpy(images[-2000:].astype(np.float32) / 255).unsqueeze(1)
    for splits in (small, large):
        assert torch.equal(splits.validation.images, expected)
        assert torch.equal(splits.validation.labels, torch.from_numpy(labels[-2000:].astype(int)))
    assert len(large.train) == 58000  # train and validation together are the training file
    assert torch.equal(torch.cat([large.train.images, large.validation.images]),
                       torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1))


@given(
    count=st.integers(2, 1000),
    validation=st.integers(0, 999),
    subset=st.one_of(st.none(), st.integers(1, 1000)),
)
def test_training_and_validation_slices_are_disjoint_and_cover_what_they_say(
    count: int, validation: int, subset: int | None
) -> None:
    if validation >= count or (subset is not None and subset > count - validation):
        with pytest.raises(DataError):
            split_training_images(count, validation, subset)
        return
    train, held_out = split_training_images(count, validation, subset)
    indices = list(range(count))
    train_ids, validation_ids = set(indices[train]), set(indices[held_out])
    assert not train_ids & validation_ids
    assert sorted(validation_ids) == indices[count - validation:]  # independent of subset
    assert len(train_ids) == (subset if subset is not None else count - validation)
    assert min(train_ids) == 0


def test_load_splits_static_binarize(mnist_root: Path) -> None:
    config = DataConfig(subset=500, binarize="static")
    first = load_splits(config, mnist_root, CPU)
    second = load_splits(config, mnist_root, CPU)
    for split in (first.train, first.validation, first.test):
        assert set(torch.unique(split.images).tolist()) == {0.0, 1.0}
        assert split.images.dtype == torch.float32
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.images, second.test.images)
    assert first.dynamic_binarize is False
    # the draw follows the pixel intensities: pure-black pixels stay 0
    grey = load_splits(DataConfig(subset=500), mnist_root, CPU)
    assert float(first.train.images[grey.train.images == 0].max()) == 0.0
    assert float(first.train.images[grey.train.images == 1].min()) == 1.0


def test_load_splits_dynamic_binarize(mnist_root: Path) -> None:
    splits = load_splits(DataConfig(subset=500, binarize="dynamic"), mnist_root, CPU)
    assert splits.dynamic_binarize is True
    assert torch.unique(splits.train.images).numel() > 2  # train stays greyscale
    assert set(torch.unique(splits.test.images).tolist()) == {0.0, 1.0}
    static = load_splits(DataConfig(subset=500, binarize="static"), mnist_root, CPU)
    assert torch.equal(splits.test.images, static.test.images)  # same fixed test draw


def test_subset_larger_than_training_set(mnist_root: Path) -> None:
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(subset=50001), mnist_root, CPU)
    message = str(info.value)
    assert "data.subset" in message and "50001" in message and "50000" in message
    assert "data.validation (10000)" in message
    with pytest.raises(DataError, match="data.validation: 60000 leaves none"):
        load_splits(DataConfig(validation=60000), mnist_root, CPU)


def test_load_splits_reads_a_hand_made_root(tmp_path: Path) -> None:
    # a tiny complete dataset built by hand: nothing to download
    folder = raw_folder(tmp_path)
    rng = np.random.default_rng(0)
    for images_name, labels_name, count in (
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 6),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 4),
    ):
        write_gz(folder / images_name, idx_bytes(rng.integers(0, 256, (count, 3, 2), np.uint8)))
        write_gz(folder / labels_name, idx_bytes(np.arange(count, dtype=np.uint8)))
    splits = load_splits(DataConfig(subset=5, validation=0), tmp_path, CPU)
    assert splits.train.images.shape == (5, 1, 3, 2)
    assert splits.test.images.shape == (4, 1, 3, 2)
    assert splits.train.labels.tolist() == [0, 1, 2, 3, 4]
    held_out = load_splits(DataConfig(validation=2), tmp_path, CPU)
    assert held_out.train.labels.tolist() == [0, 1, 2, 3]
    assert held_out.validation.labels.tolist() == [4, 5]
    with pytest.raises(DataError, match="exceeds the 4 training images"):
        load_splits(DataConfig(subset=5, validation=2), tmp_path, CPU)


# ---------------------------------------------------------------------------
# python -m vaebench data


def test_cli_data_on_real_root(mnist_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["data", "--data-root", str(mnist_root)])
    out, err = capsys.readouterr()
    assert status == 0
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 2
    train, test = lines
    assert train.startswith("mnist train: ") and re.search(r"\b60000 images\b", train)
    assert test.startswith("mnist test: ") and re.search(r"\b10000 images\b", test)
    assert all("28x28" in line and "10 classes" in line for line in lines)


def test_cli_data_on_empty_root_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = f"http://127.0.0.1:{closed_port()}/"
    monkeypatch.setitem(
        data.DATASETS, "mnist", dataclasses.replace(data.DATASETS["mnist"], mirrors=(unreachable,))
    )
    root = tmp_path / "empty"
    root.mkdir()
    status = main(["data", "--data-root", str(root)])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("vaebench: error:")
    assert "Traceback" not in err
    assert str(raw_folder(root)) in lines[0]
    assert unreachable in lines[0]
    assert leftovers(root) == []


def test_a_data_error_leaves_no_store_behind(tmp_path: Path, mnist_root, capsys) -> None:
    """A damaged data file stops `run` with one line, exit 2, and no empty mlflow.db (the
    store used to be created while the data loaded)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (Path(mnist_root) / "MNIST" / "raw").glob("*.gz"):
        raw.joinpath(source.name).write_bytes(source.read_bytes()[:1000])  # truncated
    (tmp_path / "t.yaml").write_text(
        "name: t\nbase:\n  data: {subset: 256, validation: 256}\n  train: {epochs: 1}\n"
    )
    status = main(["run", str(tmp_path / "t.yaml"), "--data-root", str(tmp_path / "data"),
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--results-dir", str(tmp_path / "results"), "--no-report", "--no-register"])
    assert status == 2
    assert "unreadable or truncated file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "t.yaml"]
