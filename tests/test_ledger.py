"""The job ledger and the failures it must survive (issue 21).

Real Redis, real Celery worker processes, a moto S3 server with faults injected by
a TCP proxy that refuses connections. Each test reproduces its scenario under the
conditions the old code path failed in, and checks: nothing lost, nothing rendered
twice, no chunk stuck.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import time

import pytest
import redis

from gridrender.scheduler import layout, liveness
from gridrender.scheduler.ledger import KillCounts, Ledger
from gridrender.scheduler.messages import ChunkMessage
from gridrender.scheduler.settings import Settings
from tests.services import TcpProxy, wait_for

SMALL = dict(dtype="float32", clip_skip=1, prompts=["a cow"], steps=2, batch_size=4)
FAST_HEARTBEAT = {"GRIDRENDER_HEARTBEAT_TTL": "3", "GRIDRENDER_HEARTBEAT_INTERVAL": "0.5"}


def stored(cluster) -> int:
    return len([k for k in cluster.keys() if k.endswith(".json")])  # noqa: SIM118  (the cluster's method)


def renders(*workers) -> int:
    return sum(int(n) for w in workers for n in re.findall(r"chunk of t: (\d+) cells rendered", w.text()))


def assert_each_cell_once(cluster, expected: int) -> None:
    versions = cluster.versions("grid/cells/")
    assert len(versions) == 2 * expected and all(v == 1 for v in versions.values()), versions


def held(client) -> dict:
    return {k.decode(): json.loads(v) for k, v in client.hgetall(liveness.HELD).items()}


@pytest.fixture
def in_process(cluster, monkeypatch):
    """This process talks to the cluster's S3 and Redis as a CLI host would."""
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    return cluster


def messages(path, output: str, submission: str) -> list[dict]:
    from gridrender.scheduler.plan import prepare

    plan = prepare(path, cuda=None, output=output)
    return [
        ChunkMessage("t", submission, output, 4, plan.partition, chunk.id, chunk.cells).to_message() for chunk in plan.chunks()
    ]


def reap_failed(caplog, chunk: str, what: str) -> bool:
    """Whether the reaper logged that it cannot reap `chunk`, saying `what`."""
    return any(
        chunk in r.getMessage() and what in r.getMessage() for r in caplog.records if "cannot reap chunk" in r.getMessage()
    )


def wait_beating(client, heartbeat, caplog, done, seconds: float) -> None:
    """Wait until `done()`, checking all along that the heartbeat's key never expires."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, caplog.text
        assert client.exists(liveness.WORKER + heartbeat.name), "the reaper delayed the heartbeat"
        time.sleep(0.1)


def test_the_reaper_survives_a_broker_error_and_a_storage_error_and_never_delays_a_heartbeat(
    in_process, job_file, monkeypatch, caplog
):
    """Old code: the reaper ran on the heartbeat thread and caught only RedisError."""
    cluster = in_process
    url = cluster.env["GRIDRENDER_BROKER_URL"]
    client = redis.Redis.from_url(url)
    s3 = TcpProxy(int(cluster.env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]))
    broker = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
    missing = f"{cluster.bucket}-later"  # its bucket does not exist yet: recording the poisoned chunk fails
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{s3.port}")
        (poison,) = messages(job_file(output=cluster.output, **SMALL, seeds=[1, 2]), f"s3://{missing}/grid", "s1")
        (dead,) = messages(job_file(output=cluster.output, **SMALL, seeds=[3]), cluster.output, "s1")
        KillCounts(client).add("t", "s1", poison["chunk"], "gridrender-0@gone#0/t0")  # its first death, earlier
        for name, message in (("gridrender-1@gone#1", poison), ("gridrender-2@gone#2", dead)):
            client.hset(
                liveness.HELD,
                name,
                json.dumps({"message": message, "queue": "q", "task": f"task-{name}", "chunk": message["chunk"], "job": "t"}),
            )
        broker.down()
        settings = Settings(
            broker_url=f"redis://127.0.0.1:{broker.port}/{url.rsplit('/', 1)[1]}",
            heartbeat_interval=0.2,
            heartbeat_ttl=1.0,
            storage_deadline=1.0,
        )
        from gridrender.scheduler.broker import make_app

        heartbeat = liveness.Heartbeat(client, "gridrender-3@here#3", ["q"], settings)
        reaper = liveness.Reaper(client, make_app(settings), settings)
        heartbeat.start()
        reaper.start()

        try:
            with caplog.at_level(logging.ERROR, logger="gridrender.scheduler.liveness"):
                # A StorageError (no such bucket) and kombu's OperationalError from send_task: both logged, both kept.
                wait_beating(
                    client,
                    heartbeat,
                    caplog,
                    lambda: reap_failed(caplog, poison["chunk"], missing) and reap_failed(caplog, dead["chunk"], ""),
                    30,
                )
                assert reaper.alive() and len(held(client)) == 2
                # A slow store: connections refused for 4 s while the reaper retries; heartbeats go on.
                cluster.s3.create_bucket(Bucket=missing)
                s3.down()
                broker.up()
                until = time.monotonic() + 4
                wait_beating(client, heartbeat, caplog, lambda: time.monotonic() > until, 10)
                s3.up()
                wait_beating(client, heartbeat, caplog, lambda: not held(client), 60)
            assert reaper.alive()
        finally:
            reaper.stop()
            heartbeat.stop()
        assert client.llen("q") == 1  # the dead worker's chunk, sent once
        assert KillCounts(client).get("t", "s1", poison["chunk"]) == 2  # counted once despite the failed passes
        from gridrender.scheduler.s3 import S3Store

        records = Ledger(S3Store.from_url(f"s3://{missing}/grid"), "t").progress(poison["partition"])
        assert records[poison["chunk"]].failed == 2 and records[poison["chunk"]].submission == "s1"
    finally:
        s3.close()
        broker.close()


def test_a_worker_back_from_a_stall_keeps_the_chunk_it_holds_now_when_its_old_one_is_reaped(redis_url):
    """Old code: the reaper HDEL'd the worker's name after re-enqueueing, deleting whatever it held by then."""
    client = redis.Redis.from_url(redis_url)
    name = "gridrender-1@host#stalled"
    old = {"message": {"job": "t", "submission": "s1", "chunk": "c1"}, "queue": "gridrender", "task": "t1", "chunk": "c1"}
    new = {**old, "message": {**old["message"], "chunk": "c2"}, "task": "t2", "chunk": "c2"}
    client.hset(liveness.HELD, name, json.dumps(old))  # its heartbeat key has expired: the reaper takes c1

    def send(message, _queue):  # meanwhile the worker wakes, finishes c1 and holds c2
        client.hset(liveness.HELD, name, json.dumps(new))
        sent.append(message["chunk"])

    sent: list[str] = []
    try:
        reaped = liveness.reap(client, send, lambda *_: pytest.fail("not poison"))
        assert [r.chunk for r in reaped] == ["c1"] and sent == ["c1"]
        assert held(client) == {name: new}  # c2 still held: if this worker dies now, c2 is reaped too
        # its heartbeat still lapsed, the next pass reaps c2 too: once, then the entry is gone
        assert [r.chunk for r in liveness.reap(client, lambda m, _q: sent.append(m["chunk"]), lambda *_: None)] == ["c2"]
        assert held(client) == {} and sent == ["c1", "c2"]
    finally:
        client.delete(
            liveness.HELD, liveness.WORKER + "other", *client.keys(liveness.LOCK + "*"), *client.keys("gridrender:kills:*")
        )


def test_finding_poisoned_chunks_reads_only_their_records_however_many_chunks_fail():
    """Old code: every `status` poll of a job with failing cells GETs up to 1,000 failing records' bodies."""
    from gridrender.scheduler.ledger.submissions import FORMAT, Submission
    from gridrender.scheduler.storage import MemoryStore

    class Counting(MemoryStore):
        gets = 0

        def get(self, key: str) -> bytes:
            Counting.gets += 1
            return super().get(key)

    store = Counting()
    ledger = Ledger(store, "t")
    submission = Submission("s1", "broker", "gridrender", 600, 300, 600, 300, 0, {"partition": "p0"}, 0.0, FORMAT)
    for n in range(300):  # a prompt every cell of which fails: every chunk has failed cells
        ledger.record("p0", f"c{n:03d}", [f"a{n}"], 0, {f"b{n}": "NaN"}, "s1", "w1")
    poison = {"kills": 2, "last": "w9", "error": "the chunk killed 2 workers"}
    ledger.record("p0", "c007", ["a7"], 0, {"b7": "killed"}, "s1", "reaper", poison)  # later: a7 found stored
    Counting.gets = 0
    (found,) = ledger.poisoned(submission)
    assert (found.chunk, found.kills, found.failed) == ("c007", 2, 1)
    assert Counting.gets == 1  # the poisoned record's body alone
    ledger.record("p0", "c007", ["a7", "b7"], 0, {}, "s1", "w2")  # `retry` rendered it: no longer poisoned
    assert ledger.poisoned(submission) == []
    # A submission from before poison was marked in keys: its failing records are read, as then.
    ledger.record("p0", "c009", ["a9"], 0, {"b9": "killed"}, "s1", "reaper", poison)
    (marked,) = [k for k in store.objects if "/c009." in k and k.endswith(".poisoned.json")]
    store.put(marked.removesuffix(".poisoned.json") + ".json", store.objects.pop(marked))  # as the old code wrote it
    assert ledger.poisoned(submission) == []  # a current submission trusts the keys
    old = Submission(**{**submission.__dict__, "format": 1})
    assert [p.chunk for p in ledger.poisoned(old)] == ["c009"]


def test_a_stale_failure_never_hides_a_newer_success_written_in_the_same_second(in_process):
    """Old code chose the newest record by LastModified (1 s on S3), ties by listing order: "c.9.3" > "c.12.0"."""
    from gridrender.scheduler.s3 import S3Store

    ledger = Ledger(S3Store.from_url(in_process.output), "t")
    cells = [f"{i:016x}" for i in range(12)]
    ledger.record("p0", "c0ffee", cells[:9], 0, {c: "RuntimeError: boom" for c in cells[9:]}, "s1", "w1")
    ledger.record("p0", "c0ffee", cells, 0, {}, "s1", "w2")  # the retry stored every cell, in the same second
    times = {int(t) for _, t in ledger.store.list_with_times(layout.progress_prefix("t", "p0"))}
    newest = ledger.progress("p0")["c0ffee"]
    assert (newest.stored, newest.failed) == (12, 0), newest
    print(f"stale failure: two records within {len(times)} distinct second(s); newest by sequence: 12 stored")


def test_a_failure_from_a_host_whose_clock_runs_fast_never_hides_a_later_success(tmp_path, monkeypatch):
    """Sequences are each host's clock: a failure recorded 2 minutes "in the future" outranked the real success."""
    from gridrender.scheduler.ledger import records
    from gridrender.scheduler.storage import LocalStore

    ledger = Ledger(LocalStore(tmp_path), "t")
    cells = [f"{i:016x}" for i in range(12)]
    fast, clock = records.Sequence(), time.time_ns
    monkeypatch.setattr(records.time, "time_ns", lambda: clock() + 120 * 10**9)
    monkeypatch.setattr(records, "SEQUENCE", fast)
    ledger.record("p0", "c0ffee", cells[:9], 0, {c: "RuntimeError: boom" for c in cells[9:]}, "s1", "fast-host")
    monkeypatch.undo()
    monkeypatch.setattr(records, "SEQUENCE", records.Sequence())  # another host, its clock right
    ledger.record("p0", "c0ffee", cells, 0, {}, "s2", "slow-host")
    newest = ledger.progress("p0")["c0ffee"]
    assert (newest.stored, newest.failed, newest.submission) == (12, 0, "s2"), newest


def test_kill_counts_belong_to_a_submission_and_a_stored_chunk_clears_them(redis_url, tmp_path):
    """Old code: gridrender:kills:<chunk> for 30 days; resubmits of the same cells stayed poisoned."""
    from gridrender.scheduler.storage import LocalStore

    kills = KillCounts(redis.Redis.from_url(redis_url))
    ledger = Ledger(LocalStore(tmp_path), "t", kills=kills)
    for death in ("w1/t1", "w2/t2", "w2/t2"):  # the second reaper of one death counts nothing
        kills.add("t", "s1", "c0ffee", death)
    assert ledger.kill_count("s1", "c0ffee") == 2 and ledger.poisoned_by_kills("s1", "c0ffee")
    assert not ledger.poisoned_by_kills("s2", "c0ffee")  # a resubmit starts from zero
    ledger.record("p0", "c0ffee", ["a"], 0, {"b": "x"}, "s1", "w3")
    assert ledger.kill_count("s1", "c0ffee") == 2  # failures keep the count
    ledger.record("p0", "c0ffee", ["a", "b"], 0, {}, "s1", "w3")
    assert ledger.kill_count("s1", "c0ffee") == 0  # every cell stored: forgotten


def test_finalize_and_export_on_a_host_with_other_wildcards_give_the_submitting_hosts_ids(job_file, tmp_path):
    """Old code re-expanded job.yaml's wildcards on the host running finalize/export: other ids, an empty export."""
    from tests.conftest import cli

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "animal.txt").write_text("cow\nhorse\n")
    (there / "animal.txt").write_text("cat\ndog\n")
    path = job_file(**{**SMALL, "prompts": ["a __animal__ in a field"], "steps": 1}, seeds=[1])
    ran = cli("run", str(path), env={"GRIDRENDER_WILDCARD_DIR": str(here)})
    assert ran.returncode == 0, ran.stderr
    output = tmp_path / "out"
    manifest = output / "jobs" / "t" / "manifest.jsonl"
    ids = [json.loads(line)["cell_id"] for line in manifest.read_text().splitlines()]
    for env in ({"GRIDRENDER_WILDCARD_DIR": str(there)}, {}):  # other files, or none on this host
        done = cli(
            "finalize",
            "t",
            "--output",
            str(output),
            env={**env, "GRIDRENDER_WILDCARD_DIR": env.get("GRIDRENDER_WILDCARD_DIR", "")},
        )
        assert done.returncode == 0 and "2/2 cells done" in done.stdout, done.stdout + done.stderr
        assert [json.loads(line)["cell_id"] for line in manifest.read_text().splitlines()] == ids
        dest = tmp_path / f"export-{len(env)}"
        exported = cli("export", "t", str(dest), "--format", "imagefolder", "--output", str(output), env=env)
        assert exported.returncode == 0 and "2 cells exported" in exported.stdout, exported.stdout + exported.stderr
        rows = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
        assert sorted(r["cell_id"] for r in rows) == sorted(ids)
        assert {r["caption"] for r in rows} == {"a cow in a field", "a horse in a field"}


def test_a_host_that_matches_embeddings_otherwise_replays_the_submitting_hosts_ids(job_file, tmp_path, monkeypatch):
    """Old code: finalize/export matched embeddings anew; a host without the model's tokenizer matches whole words."""
    from gridrender.scheduler import derivation
    from gridrender.scheduler.plan import prepare
    from gridrender.scheduler.storage import LocalStore
    from tests.support.components import write_embedding

    embeddings = tmp_path / "embeddings"
    write_embedding(embeddings / "cow.safetensors", width=32, vectors=1, seed=5)
    write_embedding(embeddings / "sharp.safetensors", width=32, vectors=1, seed=6)
    prompts = ["a Cow at dusk", "a cow in a field", "a horse"]  # CLIP lowercases: "Cow" is cow's tokens, not the word
    negatives = ["blurry", "sharp, lowres"]
    path = job_file(**{**SMALL, "prompts": prompts, "negative_prompt": negatives, "embeddings": str(embeddings)}, seeds=[1])
    plan = prepare(path, cuda=None, output=str(tmp_path / "out"))
    submitted = {c.id: [e.name for e in c.embeddings] for c in plan.cells()}
    assert sorted(map(tuple, submitted.values())) == [(), ("cow",), ("cow",), ("cow", "sharp"), ("cow", "sharp"), ("sharp",)]
    with Ledger(LocalStore(tmp_path / "out"), "t") as ledger:
        ledger.begin(plan, "local")
        stored = json.loads((tmp_path / "out" / "jobs" / "t" / "expansions").glob("*.json").__next__().read_text())
        # a row per text that triggers any (3 of the 5 texts), not per (prompt, negative) pair (5 of 6)
        assert sorted(text for text, _, _ in stored["text_embeddings"]) == ["a Cow at dusk", "a cow in a field", "sharp, lowres"]
        monkeypatch.setattr(derivation, "tokenizer_for", lambda _model: None)  # this host: whole words only
        here = [[e.name for e in c.embeddings] for c in prepare(path, cuda=None).cells()]
        assert here != list(submitted.values()), here  # expanded anew here: other embeddings, other ids
        replayed = {c.id: [e.name for e in c.embeddings] for c in ledger.plan().cells()}
        assert replayed == submitted
        # An expansion recorded before per-text rows: one row per (prompt, negative, S/R, model) that triggers any
        (recorded,) = (tmp_path / "out" / "jobs" / "t" / "expansions").glob("*.json")
        combinations = [[0, 0, 0, "builtin:tiny", ["cow"]], [0, 1, 0, "builtin:tiny", ["cow", "sharp"]]]
        combinations += [[1, 0, 0, "builtin:tiny", ["cow"]], [1, 1, 0, "builtin:tiny", ["cow", "sharp"]]]
        combinations += [[2, 1, 0, "builtin:tiny", ["sharp"]]]
        recorded.write_text(json.dumps({"prompts": prompts, "embeddings": combinations, "partition": stored["partition"]}))
        assert {c.id: [e.name for e in c.embeddings] for c in ledger.plan().cells()} == submitted


def test_a_retry_whose_send_fails_leaves_the_chunk_poisoned_for_the_next_retry(job_file, tmp_path, redis_url, monkeypatch):
    """A retry that cleared the chunk's record and then could not send it would leave it pending forever."""
    from kombu.exceptions import OperationalError

    from gridrender.scheduler.broker import make_app
    from gridrender.scheduler.errors import BrokerError, InputError
    from gridrender.scheduler.plan import prepare
    from gridrender.scheduler.storage import LocalStore
    from gridrender.scheduler.submit import retry_poisoned

    monkeypatch.setenv("GRIDRENDER_BROKER_URL", redis_url)
    settings = Settings()
    client, store = redis.Redis.from_url(redis_url), LocalStore(tmp_path / "out")
    kills = KillCounts(client)
    plan = prepare(job_file(**SMALL, seeds=[1, 2]), cuda=None, output=str(tmp_path / "out"))
    (chunk,) = plan.chunks()
    with Ledger(store, "t", settings, kills) as ledger:
        record = ledger.begin(plan, "broker", "gridrender")
        message = ChunkMessage("t", record.id, plan.job.output, 4, plan.partition, chunk.id, chunk.cells)
        for death in ("w1/t1", "w2/t2"):
            kills.add("t", record.id, chunk.id, death)
        ledger.record_poisoned(message, 2, "w2")
    app = make_app(settings)

    def broker_gone(*_args, **_kwargs):
        raise OperationalError("connection refused")

    client.set("gridrender:retrying:t", "another")  # a retry of this job running elsewhere
    with pytest.raises(InputError, match="another `gridrender retry t` is running"):
        retry_poisoned(store, "t", app, settings)
    client.delete("gridrender:retrying:t")
    monkeypatch.setattr(app, "send_task", broker_gone)
    with pytest.raises(BrokerError):
        retry_poisoned(store, "t", app, settings)
    assert not client.exists("gridrender:retrying:t")  # its lock released
    with Ledger(store, "t", settings, kills) as ledger:
        assert [p.chunk for p in ledger.poisoned(record)] == [chunk.id]  # still poisoned: `retry` again
        assert ledger.superseded(message)  # the killed workers' copies, when they come back, are dropped
    monkeypatch.undo()
    monkeypatch.setenv("GRIDRENDER_BROKER_URL", redis_url)
    try:
        assert retry_poisoned(store, "t", app, settings).chunks == 1
        with Ledger(store, "t", settings, kills) as ledger:
            assert ledger.poisoned(record) == [] and ledger.kill_count(record.id, chunk.id) == 0
        queued = [json.loads(m) for m in client.lrange("gridrender", 0, -1)]
        (sent,) = [json.loads(base64.b64decode(m["body"]))[0][0] for m in queued]
        assert sent["chunk"] == chunk.id and not Ledger(store, "t", settings, kills).superseded(ChunkMessage.from_message(sent))
    finally:
        client.delete("gridrender", *client.keys("gridrender:*"))


def test_a_failed_progress_write_is_retried_not_acknowledged(cluster, job_file, tmp_path):
    """Old code: the progress write sat outside the task's try; the chunk was acked, pending forever."""
    output = tmp_path / "out"
    path = job_file(output=str(output), **SMALL, seeds=[1, 2, 3, 4])
    assert cluster.cli("submit", str(path)).returncode == 0
    blocker = output / "jobs" / "t" / "progress"
    blocker.write_text("")  # progress/ cannot become a folder: every progress write fails
    worker = cluster.worker()
    wait_for(lambda: "cannot record its progress" in worker.text(), 90, "the progress write to fail")
    blocker.unlink()
    wait_for(
        lambda: "4/4 done" in cluster.cli("status", "t", "--output", str(output)).stdout, 60, "the retry to record the chunk"
    )
    assert renders(worker) == 4  # the retry found its cells stored: no GPU work twice
    assert len(list((output / "cells").glob("*.json"))) == 4


def test_a_worker_restarted_in_place_has_its_dead_chunk_reaped(cluster, job_file):
    """Old code: a container restarted in place kept `pid@host`, so its heartbeat hid its own dead chunk for an hour."""
    client = redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"])
    workers = [cluster.worker(**FAST_HEARTBEAT), cluster.worker(**FAST_HEARTBEAT)]
    path = job_file(output=cluster.output, **{**SMALL, "steps": 6, "batch_size": 1}, seeds=list(range(6)))
    cluster.cli("submit", str(path))  # one chunk: one worker takes it
    wait_for(lambda: held(client) and stored(cluster) >= 1, 90, "a worker to hold the chunk and store a cell")
    ((name, entry),) = held(client).items()
    holder = next(w for w in workers if f"gridrender-{w.proc.pid}@" in name)
    other = next(w for w in workers if w is not holder)
    holder.kill()
    before = stored(cluster)
    # What a restart in place leaves behind: the dead boot's chunk under the pid@host the live boot runs as.
    restarted = f"gridrender-{other.proc.pid}@{socket.gethostname()}#{name.rsplit('#', 1)[1]}"
    client.hdel(liveness.HELD, name)
    client.hset(liveness.HELD, restarted, json.dumps(entry))
    killed_at = time.monotonic()
    wait_for(lambda: "re-enqueueing it" in other.text(), 30, "the live boot's reaper to re-enqueue the dead boot's chunk")
    reaped = time.monotonic() - killed_at  # the visibility timeout is an hour
    wait_for(lambda: stored(cluster) == 6, 180, "every cell after the restart")
    assert renders(other) == 6 - before
    assert_each_cell_once(cluster, 6)
    print(f"restart in place: the dead boot's chunk re-enqueued {reaped:.1f}s after the kill")
