"""The Celery app both sides share, and queue naming: configuration only, no task code.

The scheduler sends tasks by name, so submitting needs neither torch nor the
worker package; `workers.tasks` registers the task bodies on this same app.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from .errors import BrokerError
from .models import ModelSpec
from .settings import Settings

RENDER_TASK = "gridrender.render_chunk"
SHARED_QUEUE = "gridrender"  # every worker consumes it: chunks of models no worker has loaded
_QUEUE_SAFE = re.compile(r"[^a-z0-9]+")
_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("gridrender", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # JSON only, both ways: a pickle payload on the queue is refused, never loaded.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        result_backend=None,  # storage is the source of truth for what is done
        task_ignore_result=True,
        # A chunk is acknowledged only after its cells are stored; a worker that dies
        # mid-chunk leaves it to be redelivered, never lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_default_queue=SHARED_QUEUE,
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if settings.broker_url.startswith("rediss://"):
        # Verify the server's certificate; CA bundle from the system or SSL_CERT_FILE.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app


@cache
def shared_app() -> Celery:
    return make_app()


def model_queue(model: ModelSpec) -> str:
    """One queue per model, so a worker keeps one pipeline hot: gridrender.<name>-<hash>."""
    stem = model.source.rsplit("/", 1)[-1].lower().removesuffix(".safetensors")
    name = _QUEUE_SAFE.sub("-", stem).strip("-")[:40]
    return f"{SHARED_QUEUE}.{name or 'model'}-{model.short_hash()[:8]}"


def redact(text: str) -> str:
    """Hide passwords in URLs (redis://:secret@host) before they reach a terminal or log."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


@contextmanager
def reaching_broker(action: str) -> Iterator[None]:
    """Turns the broker's connection errors (kombu, redis, amqp) into one BrokerError, redacted."""
    try:
        yield
    except (KombuError, RedisError, OSError) as exc:
        raise BrokerError(f"cannot {action}: {redact(str(exc)) or type(exc).__name__}") from None
