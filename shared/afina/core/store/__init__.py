"""Artifact stores: one interface, a local-directory and an S3 implementation."""

from __future__ import annotations

from afina.core.settings import Settings
from afina.core.store.base import ArtifactStore, ObjectInfo, sha256_file, validate_key

__all__ = ["ArtifactStore", "ObjectInfo", "open_store", "sha256_file", "validate_key"]


def open_store(settings: Settings) -> ArtifactStore:
    """The store the settings name; S3 only when ``AFINA_STORE_BACKEND=s3``."""
    if settings.store_backend == "s3":
        from afina.core.store.s3 import S3Store

        return S3Store.connect(
            settings.s3_endpoint,
            settings.s3_access_key.get_secret_value(),
            settings.s3_secret_key.get_secret_value(),
            settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            backoff_s=settings.transient_backoff_s,
        )
    from afina.core.store.local import LocalStore

    return LocalStore(settings.resolved_store_root)
