"""Artifact store on an S3 API (MinIO in production, SeaweedFS in tests), via the ``minio`` SDK."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import urllib3.exceptions
from minio import Minio
from minio.error import S3Error

from afina.core.errors import ObjectMissing, StoreError, StoreUnavailable
from afina.core.store.base import CHUNK_BYTES, ArtifactStore, HashingReader, ObjectInfo, validate_key
from afina.core.transient import retry_transient

T = TypeVar("T")
# network faults between afina and the S3 server (minio's urllib3 pool retries each request a few times
# itself first); ``S3Error`` is an answer from the server and is never one of these
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)

PART_BYTES = 16 * 1024 * 1024
MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}


class S3Store(ArtifactStore):
    """One bucket; S3 PUTs are atomic, and multipart uploads only appear when completed."""

    def __init__(self, client: Minio, bucket: str, *, retries: int = 2, backoff_s: float = 0.5) -> None:
        self.client = client
        self.bucket = bucket
        self.retries = retries
        self.backoff_s = backoff_s

    @classmethod
    def connect(cls, endpoint: str, access_key: str, secret_key: str, bucket: str, *,
                secure: bool = False, region: str | None = None, retries: int = 2,
                backoff_s: float = 0.5) -> S3Store:
        client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                       secure=secure, region=region)
        store = cls(client, bucket, retries=retries, backoff_s=backoff_s)
        store.ensure_bucket()
        return store

    def _call(self, what: str, call: Callable[[], T], *, retries: int | None = None) -> T:
        """``call()`` with network faults retried, then reported as ``StoreUnavailable`` (a 503, a requeue)."""
        try:
            return retry_transient(call, what=f"s3 {what}", retries=self.retries if retries is None else retries,
                                   backoff_s=self.backoff_s)
        except NETWORK_ERRORS:
            raise StoreUnavailable(f"the object store did not answer ({what}); try again shortly") from None

    def ensure_bucket(self) -> None:
        def ensure() -> None:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

        try:
            self._call("bucket check", ensure)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot use bucket {self.bucket!r}: {exc.code}") from None

    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> ObjectInfo:
        validate_key(key)
        # a seekable stream (a file, bytes) is sent again from its start after a network fault; a pipe is not
        start = stream.tell() if stream.seekable() else None
        readers: list[HashingReader] = []

        def put() -> None:
            if readers and start is not None:
                stream.seek(start)
            readers.append(HashingReader(stream, limit=max_bytes))
            # length -1 streams in parts; an exception aborts the multipart upload, so nothing appears
            self.client.put_object(self.bucket, key, readers[-1], length=-1, part_size=PART_BYTES)

        try:
            self._call("write", put, retries=None if start is not None else 0)
        except S3Error as exc:
            raise StoreError(f"could not write {key!r}: {exc.code}") from None
        return ObjectInfo(key=key, size=readers[-1].size, sha256=readers[-1].sha256)

    def iter_chunks(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        validate_key(key)
        try:
            response = self._call("read", lambda: self.client.get_object(self.bucket, key, offset=start,
                                                                       length=length or 0))
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                raise ObjectMissing(f"no object {key!r}") from None
            raise StoreError(f"could not read {key!r}: {exc.code}") from None
        try:
            yield from response.stream(CHUNK_BYTES)
        except NETWORK_ERRORS:
            raise StoreUnavailable("the object store stopped answering during a read; try again shortly") from None
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        try:
            result = self._call("stat", lambda: self.client.stat_object(self.bucket, key))
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                raise ObjectMissing(f"no object {key!r}") from None
            raise StoreError(f"could not stat {key!r}: {exc.code}") from None
        return ObjectInfo(key=key, size=result.size or 0)

    def list(self, prefix: str) -> list[ObjectInfo]:
        def list_all() -> list[ObjectInfo]:
            objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return [ObjectInfo(key=obj.object_name, size=obj.size or 0) for obj in objects if not obj.is_dir]

        try:
            results = self._call("list", list_all)
        except S3Error as exc:
            raise StoreError(f"could not list {prefix!r}: {exc.code}") from None
        return sorted(results, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self._call("delete", lambda: self.client.remove_object(self.bucket, key))
        except S3Error as exc:
            if exc.code not in MISSING_CODES:
                raise StoreError(f"could not delete {key!r}: {exc.code}") from None
