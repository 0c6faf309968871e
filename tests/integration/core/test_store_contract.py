"""One contract, two stores: the local directory and S3 (a real SeaweedFS server)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from afina.core.errors import InvalidRequest, ObjectMissing
from afina.core.store import ArtifactStore, sha256_file
from afina.core.store.local import LocalStore
from afina.core.store.s3 import S3Store
from tests.support.servers import SeaweedS3

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, bucket_name: str) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    server: SeaweedS3 = request.getfixturevalue("seaweedfs")
    s3 = S3Store.connect(server.endpoint, server.access_key, server.secret_key, bucket_name)
    yield s3
    s3.delete_prefix("")
    s3.client.remove_bucket(bucket_name)


class ExplodingStream(io.RawIOBase):
    """Yields some bytes, then fails like a dropped client connection."""

    def __init__(self, good_bytes: int) -> None:
        self.remaining = good_bytes

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.remaining <= 0:
            raise ConnectionResetError("client went away")
        take = self.remaining if n < 0 else min(n, self.remaining)
        self.remaining -= take
        return b"x" * take


def test_put_get_roundtrip_reports_size_and_sha256(store: ArtifactStore) -> None:
    info = store.put_bytes("datasets/t1/a/raw.jsonl", b'{"a": 1}\n')
    assert info.size == 9
    assert info.sha256 == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert store.get_bytes("datasets/t1/a/raw.jsonl") == b'{"a": 1}\n'
    assert store.stat("datasets/t1/a/raw.jsonl").size == 9
    assert store.exists("datasets/t1/a/raw.jsonl")


def test_sha256_matches_file_digest(store: ArtifactStore, tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 5000)
    info = store.put_file("models/t/m/blob.bin", path)
    assert info.sha256 == sha256_file(path)
    assert info.size == path.stat().st_size


def test_large_object_streams_in_parts(store: ArtifactStore, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with open(path, "wb") as handle:
        for i in range(40):
            handle.write(bytes([i]) * (1024 * 1024))
    store.put_file("jobs/j/big.bin", path)
    out = store.download_file("jobs/j/big.bin", tmp_path / "out" / "big.bin")
    assert sha256_file(out) == sha256_file(path)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["big.bin"]  # no temp file left behind


def test_failed_download_leaves_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectMissing):
        store.download_file("nope/missing.gguf", tmp_path / "dl" / "model.gguf")
    assert list((tmp_path / "dl").iterdir()) == []


def test_missing_object_raises_object_missing(store: ArtifactStore) -> None:
    with pytest.raises(ObjectMissing):
        store.get_bytes("nope/missing.txt")
    with pytest.raises(ObjectMissing):
        store.stat("nope/missing.txt")
    assert not store.exists("nope/missing.txt")


def test_list_is_recursive_sorted_and_prefix_scoped(store: ArtifactStore) -> None:
    for key in ["t1/b/2.txt", "t1/a/1.txt", "t1/a/sub/3.txt", "t10/x.txt", "t2/y.txt"]:
        store.put_bytes(key, key.encode())
    assert [info.key for info in store.list("t1/")] == ["t1/a/1.txt", "t1/a/sub/3.txt", "t1/b/2.txt"]
    assert store.list("absent/") == []


def test_delete_is_idempotent_and_delete_prefix_counts(store: ArtifactStore) -> None:
    store.put_bytes("p/a", b"1")
    store.put_bytes("p/b/c", b"2")
    store.delete("p/a")
    store.delete("p/a")
    assert not store.exists("p/a")
    assert store.delete_prefix("p/") == 1
    assert store.list("p/") == []


def test_overwrite_replaces_whole_object(store: ArtifactStore) -> None:
    store.put_bytes("k/manifest.json", b"old-and-longer")
    store.put_bytes("k/manifest.json", b"new")
    assert store.get_bytes("k/manifest.json") == b"new"


def test_failed_stream_leaves_nothing_visible(store: ArtifactStore) -> None:
    with pytest.raises((ConnectionResetError, Exception)):
        store.put_stream("k/partial.bin", ExplodingStream(3 * 1024 * 1024))
    assert not store.exists("k/partial.bin")
    assert store.list("k/") == []


def test_size_limit_aborts_and_keeps_nothing(store: ArtifactStore) -> None:
    with pytest.raises(OverflowError):
        store.put_stream("k/too-big.bin", io.BytesIO(b"y" * 5000), max_bytes=1000)
    assert not store.exists("k/too-big.bin")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b"])
def test_unsafe_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidRequest):
        store.put_bytes(key, b"x")


def test_directory_upload_and_download_roundtrip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "ckpt"
    (source / "nested").mkdir(parents=True)
    (source / "adapter.safetensors").write_bytes(b"weights")
    (source / "nested" / "state.json").write_text("{}")
    store.upload_dir(source, "jobs/j1/checkpoints/step-0000002")
    target = tmp_path / "restored"
    store.download_dir("jobs/j1/checkpoints/step-0000002", target)
    assert (target / "adapter.safetensors").read_bytes() == b"weights"
    assert (target / "nested" / "state.json").read_text() == "{}"


def test_s3_rejects_wrong_credentials(seaweedfs: SeaweedS3, bucket_name: str) -> None:
    from afina.core.errors import StoreError

    with pytest.raises(StoreError):
        S3Store.connect(seaweedfs.endpoint, "wrong", "credentials", bucket_name)


def test_ranged_reads_return_exactly_the_asked_bytes(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 9000  # 2.3 MB: crosses the 1 MiB chunk size
    store.put_bytes("ranges/blob.bin", data)
    for start, length in ((0, 10), (5, 1), (1_048_570, 20), (len(data) - 7, None), (123_456, 1_500_000)):
        got = b"".join(store.iter_chunks("ranges/blob.bin", start, length))
        assert got == data[start:None if length is None else start + length], (start, length)
    assert b"".join(store.iter_chunks("ranges/blob.bin")) == data
