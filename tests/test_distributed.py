"""submit -> Redis -> worker processes -> S3 (moto server), all real."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import redis

from tests.services import wait_for

JOB = dict(
    prompts=["a cow standing in a field", "a lighthouse at dusk"],
    clip_skip=[1, 2],
    seeds=[1, 2, 3, 4],
    dtype="float32",
    steps=2,
    batch_size=4,
)
QUEUE = "gridrender.builtin-tiny-0920326f"


def queued(cluster, queue=QUEUE) -> int:
    return redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"]).llen(queue)


def submitted(result) -> tuple[int, int]:
    match = re.search(r": ([\d,]+) cells in ([\d,]+) chunks", result.stdout)
    assert match, result.stdout + result.stderr
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


def test_two_workers_render_every_cell_once_into_s3(cluster, job_file):
    path = job_file(output=cluster.output, **JOB)
    cluster.worker(QUEUE)
    cluster.worker(QUEUE)
    result = cluster.cli("submit", str(path), "--wait", GRIDRENDER_CHUNK_CELLS="4")
    assert result.returncode == 0, result.stderr
    assert submitted(result) == (16, 4)

    keys = cluster.keys()
    assert len([k for k in keys if k.endswith(".png")]) == 16
    assert len([k for k in keys if k.endswith(".json")]) == 16
    assert all(count == 1 for count in cluster.versions("grid/cells/").values())
    manifest = cluster.s3.get_object(Bucket=cluster.bucket, Key="grid/jobs/t/manifest.jsonl")["Body"].read().decode()
    lines = [json.loads(line) for line in manifest.splitlines()]
    assert len(lines) == 16 and {line["status"] for line in lines} == {"done"}
    record = json.loads(cluster.s3.get_object(Bucket=cluster.bucket, Key=f"grid/{lines[0]['record']}")["Body"].read())
    assert record["cell_id"] == lines[0]["cell_id"] and record["clip_layers"] == 12
    # each worker loaded the model once, however many chunks it took, and logged each chunk's speed
    for proc in cluster.workers:
        assert proc.text().count("model load #") <= 1
        assert "model load #2" not in proc.text()
    assert re.search(r"chunk of t: \d+ cells rendered.*; \d+\.\d\d img/s", "".join(p.text() for p in cluster.workers))
    # and published the rate that sizes the next submit's chunks
    client = redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"])
    (key,) = client.keys("gridrender:rate:*")
    assert float(client.get(key)) > 0 and key.decode().endswith(":float32")
    client.close()


def test_resubmitting_enqueues_nothing_and_new_seeds_only_new_cells(cluster, job_file):
    path = job_file(output=cluster.output, **JOB)
    cluster.worker(QUEUE)
    assert cluster.cli("submit", str(path), "--wait").returncode == 0
    for proc in cluster.workers:
        proc.stop()

    again = cluster.cli("submit", str(path))
    assert submitted(again) == (0, 0)
    assert queued(cluster) == 0 and queued(cluster, "gridrender") == 0

    more = cluster.cli(
        "submit", str(job_file(output=cluster.output, **{**JOB, "seeds": [1, 2, 3, 4, 5, 6]})), GRIDRENDER_CHUNK_CELLS="3"
    )
    # 2 prompts x 2 skips x 2 new seeds; the job's chunks of 3 are seeds 1-3 (all stored: not sent) and 4-6
    assert submitted(more) == (8, 4)
    assert "no worker consumes queue gridrender" in more.stderr  # no worker runs: the shared queue, and a hint
    assert queued(cluster, "gridrender") == 4


def test_worker_killed_mid_chunk_loses_nothing_and_overwrites_nothing(cluster, job_file):
    # One 12-cell chunk rendered one cell per call, so the kill lands inside it.
    path = job_file(output=cluster.output, **{**JOB, "prompts": ["a cow"], "seeds": list(range(6)), "batch_size": 1, "steps": 6})
    timeout = {"GRIDRENDER_VISIBILITY_TIMEOUT": "8"}
    first = cluster.worker(QUEUE, **timeout)
    # A chunk longer than the visibility timeout on purpose (Redis must redeliver it): a stated fast rate
    # keeps submit from sizing chunks to a quarter of those 8 s.
    fast = {**timeout, "GRIDRENDER_WORKER_RATE": "100"}
    assert submitted(cluster.cli("submit", str(path), **fast)) == (12, 1)
    wait_for(lambda: len([k for k in cluster.keys() if k.endswith(".json")]) >= 2, 90, "the first cells")  # noqa: SIM118  (the cluster's method)
    first.kill()
    stored_before = {k: v for k, v in cluster.versions("grid/cells/").items()}
    assert 2 <= len([k for k in stored_before if k.endswith(".json")]) < 12

    # The unacked chunk is restored only once it is older than the visibility timeout.
    time.sleep(9)
    cluster.worker(QUEUE, **timeout)
    wait_for(lambda: len([k for k in cluster.keys() if k.endswith(".json")]) == 12, 120, "all 12 cells")  # noqa: SIM118  (the cluster's method)
    versions = cluster.versions("grid/cells/")
    assert len([k for k in versions if k.endswith(".png")]) == 12
    assert all(count == 1 for count in versions.values()), {k: v for k, v in versions.items() if v > 1}
    assert not [k for k in cluster.keys("grid/") if ".tmp" in k]


def test_failed_cells_are_recorded_and_resubmitting_retries_only_them(cluster, job_file, tiny_folder, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    path = job_file(
        output=cluster.output, model=str(model), prompts=["a cow"], clip_skip=1, seeds=[1, 2], dtype="float32", steps=2
    )
    queue = None
    result = cluster.cli("submit", str(path))
    queue = re.search(r"queue (\S+)", result.stdout)[1]
    shutil.rmtree(model)  # the worker cannot find the model: every attempt fails
    retries = {"GRIDRENDER_TASK_RETRIES": "1"}
    cluster.worker(queue, **retries)
    wait_for(
        lambda: "0/2 done, 2 failed" in cluster.cli("status", "t", "--output", cluster.output).stdout,
        60,
        "failures in the progress record",
    )
    status = cluster.cli("status", "t", "--output", cluster.output)
    assert status.returncode == 1  # a job with failed cells
    assert "ModelError" in status.stderr

    shutil.copytree(tiny_folder, model)
    again = cluster.cli("submit", str(path), "--wait")
    assert again.returncode == 0, again.stderr
    assert submitted(again) == (2, 1)
    assert "2/2 done, 0 failed" in cluster.cli("status", "t", "--output", cluster.output).stdout


def test_cancel_drops_pending_chunks(cluster, job_file):
    path = job_file(output=cluster.output, **JOB)
    assert submitted(cluster.cli("submit", str(path), GRIDRENDER_CHUNK_CELLS="4")) == (16, 4)
    result = cluster.cli("cancel", "t", "--output", cluster.output)
    assert result.returncode == 0 and "cancelled" in result.stdout
    proc = cluster.worker("gridrender")  # no worker ran at submit: the chunks went to the shared queue
    wait_for(lambda: queued(cluster, "gridrender") == 0 and proc.text().count("succeeded") >= 4, 60, "the queue to drain")
    assert [k for k in cluster.keys() if k.endswith(".json")] == []  # noqa: SIM118  (the cluster's method)
    status = cluster.cli("status", "t", "--output", cluster.output)
    assert "0/16 done" in status.stdout and "cancelled" in status.stdout


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers'} or name.startswith('gridrender.workers'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['gridrender'] + sys.argv[1:]
from gridrender.cli import app
try:
    app()
finally:
    assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)
"""


def test_the_scheduler_side_runs_without_torch(cluster, job_file):
    path = job_file(output=cluster.output, **JOB)
    env = cluster.env
    for args in (
        ["validate", str(path)],
        ["submit", str(path)],
        ["status", "t", "--output", cluster.output],
        ["finalize", "t", "--output", cluster.output],
        ["cancel", "t", "--output", cluster.output],
    ):
        result = subprocess.run(
            [sys.executable, "-c", BLOCK_TORCH, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert queued(cluster, "gridrender") == 1  # no worker listens: the shared queue


def test_scheduler_modules_do_not_import_torch():
    code = (
        "import sys, gridrender.scheduler.plan, gridrender.scheduler.submit, gridrender.scheduler.status, "
        "gridrender.scheduler.s3, gridrender.scheduler.broker, gridrender.scheduler.messages, "
        "gridrender.scheduler.finalize, gridrender.cli; "
        "print(sorted({'torch', 'diffusers', 'transformers', 'gridrender.workers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "[]", result.stderr


def test_password_protected_redis_works_and_the_password_stays_out_of_logs(cluster, job_file, tmp_path):
    from tests.services import start_redis

    server, port = start_redis(tmp_path / "redis.log", "--requirepass", "pa55-w0rd-xyz")
    try:
        url = {"GRIDRENDER_BROKER_URL": f"redis://:pa55-w0rd-xyz@127.0.0.1:{port}/0"}
        proc = cluster.worker(QUEUE, **url)
        path = job_file(output=cluster.output, **{**JOB, "seeds": [1]})
        result = cluster.cli("submit", str(path), "--wait", **url)
        assert result.returncode == 0, result.stderr
        assert len([k for k in cluster.keys() if k.endswith(".json")]) == 4  # noqa: SIM118  (the cluster's method)
        assert "pa55-w0rd-xyz" not in proc.text() + result.stdout + result.stderr
        new_cells = job_file(output=cluster.output, **{**JOB, "seeds": [2]})
        wrong = cluster.cli("submit", str(new_cells), GRIDRENDER_BROKER_URL=f"redis://:wrong-secret@127.0.0.1:{port}/0")
        assert wrong.returncode == 1 and "cannot enqueue" in wrong.stderr, wrong.stderr
        assert "wrong-secret" not in wrong.stdout + wrong.stderr
    finally:
        server.stop()


def test_rediss_urls_verify_the_certificate():
    import ssl

    from gridrender.scheduler.broker import make_app
    from gridrender.scheduler.settings import Settings

    app = make_app(Settings(broker_url="rediss://:secret@redis.example:6380/0"))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1


def test_gpus_flag_starts_one_worker_process_per_gpu(cluster, tmp_path):
    from tests.services import Process

    proc = Process(
        [sys.executable, "-m", "gridrender", "worker", "-Q", QUEUE, "--gpus", "0,1"], cluster.env, tmp_path / "gpus.log"
    )
    try:
        wait_for(lambda: proc.text().count(" ready.") == 2, 90, "two workers")
        names = set(re.findall(r"(gridrender-\d+-gpu[01])@", proc.text()))
        assert {n[-4:] for n in names} == {"gpu0", "gpu1"}
    finally:
        assert proc.stop() == 0


def test_a_model_worker_warms_up_every_sdxl_shape_before_it_is_ready(cluster, tmp_path):
    """`--warmup` repeats: an SDXL worker meets several aspect buckets, each a shape of its own to compile."""
    worker = cluster.worker(
        None,
        "--model",
        "builtin:tiny-sdxl",
        "--warmup",
        "64x64:2",
        "--warmup",
        "64x96:1",
        "--no-compile",
        GRIDRENDER_AUTO_DTYPE="float32",
        GRIDRENDER_READY_FILE=str(tmp_path / "ready"),
    )
    text = worker.text()
    assert "warm-up at 64x64, batch 2" in text and "warm-up at 64x96, batch 1" in text, text
    assert text.index("warm-up at 64x96") < text.index(" ready.")  # before it takes a task
    assert (tmp_path / "ready").read_text() == "builtin:tiny-sdxl float32\n"
