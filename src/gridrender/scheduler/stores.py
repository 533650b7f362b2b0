"""Which store a job's `output` names: the one place that knows every backend.

storage.py defines the Store interface and the local and in-memory stores; s3.py
builds on it. Choosing between them lives here, so neither imports the other's user.
"""

from __future__ import annotations

from .storage import LocalStore, Store


def open_store(output: str) -> Store:
    """The store behind a job's `output`: s3://bucket/prefix or a local folder."""
    if output.startswith("s3://"):
        from .s3 import S3Store  # boto3 takes a while to import; local jobs never need it

        return S3Store.from_url(output)
    return LocalStore(output)
