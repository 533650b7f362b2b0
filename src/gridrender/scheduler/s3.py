"""S3-compatible storage through boto3 (AWS S3, MinIO, moto), same layout as a folder.

The endpoint and credentials come from the standard AWS variables
(`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, ...), so MinIO works unchanged.
Cells are written with `IfNoneMatch="*"`: a 412 means another attempt wrote it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import StorageError
from .storage import NotFound, Store, check_key, parse_s3_url

_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}

# Standard retry mode backs off exponentially with jitter on throttling, 5xx and
# connection errors; 10 attempts ride out a restart of a MinIO node.
_CONFIG = Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=5, read_timeout=60)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", client: Any = None):  # a boto3 S3 client (untyped)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client or boto3.client("s3", config=_CONFIG)

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            reason = f"{error.get('Code', '?')}: {error.get('Message', '')}"
            transient = (
                status >= HTTPStatus.INTERNAL_SERVER_ERROR
                or status == HTTPStatus.TOO_MANY_REQUESTS
                or error.get("Code") in _THROTTLING
            )
        else:  # connection refused, reset or timed out
            reason, transient = type(exc).__name__, True
        return StorageError(f"cannot {action} {self.url(key)} ({reason})", transient=transient)

    def put_new(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type, IfNoneMatch="*")
            return True
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status == HTTPStatus.PRECONDITION_FAILED or code == "PreconditionFailed":
                return False
            if status == HTTPStatus.CONFLICT and code == "ConditionalRequestConflict":
                # A concurrent conditional write to the same key is in flight: whichever
                # wins, the object will exist; report it as not written by us.
                return False
            raise self._fail("write", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("write", key, exc) from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("write", key, exc) from None

    def _put_file(self, key: str, file: IO[bytes], content_type: str) -> None:
        try:  # multipart above 8 MB: a manifest of a million lines never sits in memory
            self.client.upload_fileobj(file, self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("write", key, exc) from None

    def _body(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(f"{self.url(key)} does not exist") from None
            raise self._fail("read", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("read", key, exc) from None

    def get(self, key: str) -> bytes:
        body = self._body(key)
        try:
            data: bytes = body.read()
            return data
        except BotoCoreError as exc:
            raise self._fail("read", key, exc) from None

    def lines(self, key: str) -> Iterator[bytes]:
        body = self._body(key)
        try:
            yield from body.iter_lines(keepends=True)
        except BotoCoreError as exc:
            raise self._fail("read", key, exc) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == HTTPStatus.NOT_FOUND:
                return False
            raise self._fail("check", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("check", key, exc) from None

    def list_with_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        full = self._key(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], obj["LastModified"].timestamp()
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("list", prefix, exc) from None
