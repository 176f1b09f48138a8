"""Object storage for the api-server: the ``Store`` interface with S3 semantics and its two
backends, ``LocalFSStore`` (files under a root, signed URLs served by the api-server) and
``S3Store`` (any S3-compatible server). docs/storage.md describes them."""

from .base import (
    MAX_KEY_BYTES,
    MAX_LIST_LIMIT,
    ByteRange,
    IncompleteUpload,
    InvalidKey,
    InvalidMetadata,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectReader,
    ObjectSummary,
    ObjectTooLarge,
    PresignedUrl,
    RangeNotSatisfiable,
    Store,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
    validate_key,
    validate_metadata,
    validate_prefix,
)
from .localfs import LocalFSStore
from .s3 import S3Store
from .signing import SignatureInvalid, SignedRequest, SignedUrlError, UrlExpired, UrlSigner

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_LIST_LIMIT",
    "ByteRange",
    "IncompleteUpload",
    "InvalidKey",
    "InvalidMetadata",
    "ListPage",
    "LocalFSStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectReader",
    "ObjectSummary",
    "ObjectTooLarge",
    "PresignedUrl",
    "RangeNotSatisfiable",
    "S3Store",
    "SignatureInvalid",
    "SignedRequest",
    "SignedUrlError",
    "Store",
    "StoreAccessDenied",
    "StoreError",
    "StoreUnavailable",
    "UrlExpired",
    "UrlSigner",
    "validate_key",
    "validate_metadata",
    "validate_prefix",
]
