"""Artifact store on an S3 API (MinIO in production, SeaweedFS in tests), via the ``minio`` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from minio import Minio
from minio.error import S3Error

from afina.core.errors import ObjectMissing, StoreError
from afina.core.store.base import CHUNK_BYTES, ArtifactStore, HashingReader, ObjectInfo, validate_key

PART_BYTES = 16 * 1024 * 1024
MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}


class S3Store(ArtifactStore):
    """One bucket; S3 PUTs are atomic, and multipart uploads only appear when completed."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def connect(cls, endpoint: str, access_key: str, secret_key: str, bucket: str, *,
                secure: bool = False, region: str | None = None) -> S3Store:
        client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                       secure=secure, region=region)
        store = cls(client, bucket)
        store.ensure_bucket()
        return store

    def ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot use bucket {self.bucket!r}: {exc.code}") from None

    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> ObjectInfo:
        validate_key(key)
        reader = HashingReader(stream, limit=max_bytes)
        try:
            # length -1 streams in parts; an exception aborts the multipart upload, so nothing appears
            self.client.put_object(self.bucket, key, reader, length=-1, part_size=PART_BYTES)
        except S3Error as exc:
            raise StoreError(f"could not write {key!r}: {exc.code}") from None
        return ObjectInfo(key=key, size=reader.size, sha256=reader.sha256)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        validate_key(key)
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                raise ObjectMissing(f"no object {key!r}") from None
            raise StoreError(f"could not read {key!r}: {exc.code}") from None
        try:
            yield from response.stream(CHUNK_BYTES)
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        try:
            result = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                raise ObjectMissing(f"no object {key!r}") from None
            raise StoreError(f"could not stat {key!r}: {exc.code}") from None
        return ObjectInfo(key=key, size=result.size or 0)

    def list(self, prefix: str) -> list[ObjectInfo]:
        try:
            objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            results = [ObjectInfo(key=obj.object_name, size=obj.size or 0) for obj in objects
                       if not obj.is_dir]
        except S3Error as exc:
            raise StoreError(f"could not list {prefix!r}: {exc.code}") from None
        return sorted(results, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self.client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code not in MISSING_CODES:
                raise StoreError(f"could not delete {key!r}: {exc.code}") from None
