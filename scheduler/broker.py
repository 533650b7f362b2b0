"""The Celery app both sides share: configuration only, no task code.

The scheduler sends tasks by name, so submitting needs neither torch nor the
worker package; `workers.tasks` registers the task bodies on this same app.
"""
from __future__ import annotations

import ssl
from functools import lru_cache

from celery import Celery

from .settings import Settings

RENDER_TASK = "gridrender.render_chunk"
DEFAULT_QUEUE = "gridrender"


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
        task_default_queue=DEFAULT_QUEUE,
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if settings.broker_url.startswith("rediss://"):
        # Verify the server's certificate; CA bundle from the system or SSL_CERT_FILE.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app


@lru_cache(maxsize=None)
def shared_app() -> Celery:
    return make_app()
