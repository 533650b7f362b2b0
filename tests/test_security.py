"""Security basics: no pickle from the queue, no escape from the output root, no
leaked secrets, no cell written under another cell's key."""

from __future__ import annotations

import base64
import os

import pytest
import redis
from celery import Celery

from gridrender.scheduler.errors import StorageError
from gridrender.scheduler.s3 import S3Store
from tests.services import wait_for

QUEUE = "gridrender.builtin-tiny-0920326f"
SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"
BROKER_PASSWORD = "br0ker-pa55w0rd-s3cret"


class Exploit:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_message_is_refused_and_never_unpickled(cluster, tmp_path):
    marker = tmp_path / "pwned"
    worker = cluster.worker(QUEUE)
    sender = Celery("attacker", broker=cluster.env["GRIDRENDER_BROKER_URL"])
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    sender.send_task("gridrender.render_chunk", args=[Exploit(str(marker))], queue=QUEUE, serializer="pickle")
    wait_for(lambda: "untrusted content" in worker.text(), 30, "the worker to refuse the message")
    assert not marker.exists()
    assert worker.alive()
    assert redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"]).llen(QUEUE) == 0


def test_a_tampered_message_cannot_write_another_cells_key(cluster, job_file):
    from gridrender.scheduler.messages import ChunkMessage
    from gridrender.scheduler.plan import prepare

    path = job_file(output=cluster.output, seeds=[1, 2], clip_skip=1, dtype="float32", steps=2)
    plan = prepare(path, cuda=None)
    (chunk,) = plan.chunks()
    message = ChunkMessage("t", "s1", cluster.output, 4, plan.partition, chunk.id, chunk.cells).to_message()
    message["cells"][0][0] = chunk.cells[1].id  # claims cell 2's id for cell 1's parameters
    sender = Celery("attacker", broker=cluster.env["GRIDRENDER_BROKER_URL"])
    sender.send_task("gridrender.render_chunk", args=[message], queue=QUEUE)
    worker = cluster.worker(QUEUE)
    wait_for(lambda: "dropping task" in worker.text(), 60, "the worker to drop the message")
    assert "does not match its parameters" in worker.text()
    assert cluster.keys() == []


# a full-width letter: the input under test
@pytest.mark.parametrize(
    "url",
    ["s3://bucket/../etc", "s3://bucket/a/../../b", "s3://bucket/a\\b", "s3://bucket/ａ", "s3://bucket/a\0b"],  # noqa: RUF001
)
def test_s3_prefixes_cannot_climb_out(url):
    with pytest.raises(StorageError):
        S3Store(url[5:].split("/", 1)[0], url[5:].split("/", 1)[1], client=object())


def test_an_escaping_output_prefix_is_bad_input(job_file):
    from tests.conftest import cli

    result = cli("run", str(job_file(output="s3://bucket/../escape")))
    assert result.returncode == 2 and "output" in result.stderr


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "a\\b", "ｔ"])  # noqa: RUF001  (a full-width letter: the input under test)
def test_job_names_on_the_command_line_cannot_climb_out(name, tmp_path):
    from tests.conftest import cli

    result = cli("status", name, "--output", str(tmp_path))
    assert result.returncode == 2


def test_credentials_never_reach_records_job_files_logs_or_errors(cluster, job_file, tmp_path):
    from tests.services import start_redis

    server, port = start_redis(tmp_path / "redis.log", "--requirepass", BROKER_PASSWORD)
    try:
        secrets = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "GRIDRENDER_BROKER_URL": f"redis://:{BROKER_PASSWORD}@127.0.0.1:{port}/0"}
        # the moto server accepts any key; the worker and CLI sign with ours
        worker = cluster.worker(QUEUE, **secrets)
        path = job_file(output=cluster.output, seeds=[1, 2], clip_skip=[1, 2], dtype="float32", steps=2)
        outputs = []
        for args in (
            ["submit", str(path), "--wait"],
            ["status", "t", "--output", cluster.output],
            ["finalize", "t", "--output", cluster.output],
            ["validate", str(path)],
            ["submit", str(job_file("other.yaml", output="s3://no-such-bucket-here/x"))],
        ):
            result = cluster.cli(*args, **secrets)
            outputs.append(result.stdout + result.stderr)
        assert "4/4" in outputs[1]
        everything = "\n".join(outputs) + worker.text()
        for key in cluster.keys("grid/"):
            everything += cluster.s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read().decode("latin-1")
        assert len(cluster.keys("grid/")) >= 4 * 2 + 3
        for secret in (SECRET_KEY, BROKER_PASSWORD, base64.b64encode(SECRET_KEY.encode()).decode()):
            assert secret not in everything
    finally:
        server.stop()
