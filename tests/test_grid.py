"""Cells: content-addressed ids, stable order, batches that share a pipeline call."""

from __future__ import annotations

from gridrender.scheduler import grid
from gridrender.scheduler.jobfile import parse_job
from gridrender.scheduler.models import ModelSpec, resolve

JOB = b"""\
name: g
model: builtin:tiny
prompts: [a cow, a dog]
clip_skip: [1, 2]
seeds: [1, 2, 3]
sampler: [Euler a, DDIMScheduler]
"""


def cells(text=JOB, model=None, dtype="float32"):
    return list(grid.expand({**parse_job(text).grid_values(), "model": [model or resolve("builtin:tiny")], "dtype": [dtype]}))


def test_same_parameters_same_id_in_any_job():
    a = cells()
    b = cells(JOB.replace(b"name: g", b"name: other").replace(b"seeds: [1, 2, 3]", b"seeds: [3, 9]"))
    by_params = {(c.prompt, c.clip_skip, c.seed, c.sampler): c.id for c in a}
    shared = [c for c in b if c.seed == 3]
    assert shared and all(by_params[(c.prompt, c.clip_skip, c.seed, c.sampler)] == c.id for c in shared)


def test_every_pixel_changing_parameter_changes_the_id():
    tiny = resolve("builtin:tiny")
    base = dict(
        model=tiny,
        prompt="p",
        negative_prompt="",
        clip_skip=1,
        seed=1,
        sampler="Euler a",
        schedule="Automatic",
        steps=4,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    ref = grid.make_cell(**base).id
    other_model = ModelSpec("x.safetensors", "file", "/x.safetensors", None, "ab" * 32, 12)
    changes = dict(
        model=other_model,
        prompt="q",
        negative_prompt="n",
        clip_skip=2,
        seed=2,
        sampler="DDIMScheduler",
        schedule="Karras",
        steps=5,
        guidance=7.5,
        width=72,
        height=72,
        dtype="float16",
    )
    for key, value in changes.items():
        assert grid.make_cell(**{**base, key: value}).id != ref, key


def test_a_text_that_a1111s_cleaning_changes_gets_a_new_id_and_others_keep_theirs(monkeypatch):
    """ftfy and open_clip's HTML unescaping change what the encoder reads for some texts: those
    cells must not keep the ids they had when gridrender read the raw text."""
    tiny = resolve("builtin:tiny")
    base = dict(
        model=tiny,
        negative_prompt="",
        clip_skip=1,
        seed=1,
        sampler="Euler a",
        schedule="Automatic",
        steps=4,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    texts = ("a cow, (masterpiece:1.2)", "猫", "café au lait", "\u201ccow\u201d", "Tom &amp; Jerry", "（masterpiece）")  # noqa: RUF001  (full-width brackets: the text under test)
    ids = {t: grid.make_cell(**base, prompt=t).id for t in texts}
    with monkeypatch.context() as m:
        m.setattr(grid, "text_identity", lambda text: text)  # the ids before the cleaning existed
        before = {t: grid.make_cell(**base, prompt=t).id for t in texts}
    assert [t for t in texts if ids[t] != before[t]] == ["\u201ccow\u201d", "Tom &amp; Jerry", "（masterpiece）"]  # noqa: RUF001  (full-width brackets: the text under test)


def test_model_identity_ignores_where_the_file_lies():
    a = ModelSpec("./a/m.safetensors", "file", "/a/m.safetensors", None, "cd" * 32, 12)
    b = ModelSpec("/b/m.safetensors", "file", "/b/m.safetensors", None, "cd" * 32, 12)
    params = dict(
        prompt="p",
        negative_prompt="",
        clip_skip=1,
        seed=1,
        sampler="Euler",
        schedule="Automatic",
        steps=4,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    assert grid.make_cell(model=a, **params).id == grid.make_cell(model=b, **params).id


def test_expansion_order_is_stable_and_seed_is_innermost():
    a, b = cells(), cells()
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == len(a) == 2 * 2 * 3 * 2
    assert [c.seed for c in a[:3]] == [1, 2, 3]
    assert a[0].prompt == "a cow" and a[-1].prompt == "a dog"
    assert a[0].sampler == "Euler a" and a[-1].sampler == "DDIMScheduler"  # call parameters outermost


def test_batches_share_call_parameters_and_respect_batch_size(renderer):
    all_cells = cells()
    batches = renderer.batches(all_cells, 4, renderer.encode(all_cells[0].model, all_cells))
    assert sorted(c.id for b in batches for c in b) == sorted(c.id for c in all_cells)
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert len({c.call_key() for c in batch}) == 1
    # prompts and clip skips of one sampler mix inside a batch
    assert any(len({(c.prompt, c.clip_skip) for c in b}) > 1 for b in batches)


def test_batch_dependent_samplers_render_one_by_one(renderer):
    def batches(cells, size):
        return renderer.batches(cells, size, renderer.encode(cells[0].model, cells))

    diffusers_sde = cells(JOB.replace(b"[Euler a, DDIMScheduler]", b"DPMSolverSDEScheduler"))
    assert all(len(b) == 1 for b in batches(diffusers_sde, 8))
    a1111_sde = cells(JOB.replace(b"[Euler a, DDIMScheduler]", b"DPM++ SDE Karras"))  # a Brownian tree per cell
    assert max(len(b) for b in batches(a1111_sde, 8)) == 8


def test_auto_dtype_is_resolved_per_device():
    from gridrender.scheduler.settings import Settings, concrete_dtype

    assert concrete_dtype("auto", cuda=True) == "float16"
    assert concrete_dtype("auto", cuda=False) == "float32"
    assert concrete_dtype("auto", cuda=None, settings=Settings(auto_dtype="bfloat16")) == "bfloat16"
    assert concrete_dtype("bfloat16", cuda=False) == "bfloat16"


def test_combined_sampler_names_are_the_same_cells_as_sampler_plus_schedule():
    combined = cells(JOB.replace(b"[Euler a, DDIMScheduler]", b"DPM++ 2M Karras"))
    separate = cells(JOB.replace(b"[Euler a, DDIMScheduler]", b"DPM++ 2M\nschedule: Karras"))
    assert [c.id for c in combined] == [c.id for c in separate]
    assert {(c.sampler, c.schedule) for c in combined} == {("DPM++ 2M", "Karras")}
    plain = cells(JOB.replace(b"[Euler a, DDIMScheduler]", b"DPM++ 2M"))
    assert [c.id for c in plain] == [c.id for c in combined]  # Automatic: A1111 1.9+'s default for DPM++ 2M
    uniform = cells(JOB.replace(b"[Euler a, DDIMScheduler]", b"DPM++ 2M\nschedule: Uniform"))
    assert {c.schedule for c in uniform} == {"Uniform"}  # what the name meant before A1111 1.9
    assert not {c.id for c in uniform} & {c.id for c in combined}


def test_chunks_are_runs_of_one_call_and_their_ids_are_stable():
    all_cells = cells()
    chunks = list(grid.chunked(all_cells, 5))
    assert [c.id for chunk in chunks for c in chunk] == [c.id for c in all_cells]
    assert all(len({c.call_key() for c in chunk}) == 1 and len(chunk) <= 5 for chunk in chunks)
    assert [grid.chunk_id(c) for c in chunks] == [grid.chunk_id(c) for c in grid.chunked(cells(), 5)]


# -- chunks sized by expected duration ----------------------------------------------------------


def test_chunks_stay_well_under_the_grace_and_visibility_timeout_at_any_rate():
    """5·10^6 cells made 2,442-cell chunks: 58 min at 0.7 cells/s, past the 3600 s visibility timeout."""
    from gridrender.scheduler.rates import MAX_CHUNK_CELLS, chunk_size
    from gridrender.scheduler.settings import Settings

    settings = Settings()
    grace, visibility = 600, settings.visibility_timeout
    for rate in (0.01, 0.1, 0.7, 5.0, 40.0, 1000.0):
        size = chunk_size(5_000_000, settings, rate)
        assert 1 <= size <= MAX_CHUNK_CELLS and size / rate <= settings.chunk_seconds <= grace / 2, rate
    assert chunk_size(5_000_000, settings, 0.1) == 30 and chunk_size(5_000_000, settings, 5.0) == 1500
    unknown = chunk_size(5_000_000, settings)  # no rate measured: the assumed (conservative) one
    assert unknown / 0.1 < visibility / 2  # even a 0.1 cells/s worker finishes it long before a redelivery
    assert chunk_size(100, settings) == settings.chunk_cells  # small jobs keep the configured size
    assert chunk_size(5_000_000, Settings(visibility_timeout=400), 5.0) == 500  # a quarter of a short timeout


def test_submit_sizes_chunks_from_the_rate_workers_publish_and_recovery_keeps_them(redis_url, tmp_path):
    import redis

    from gridrender.scheduler import rates
    from gridrender.scheduler.plan import Plan, prepare
    from gridrender.scheduler.settings import Settings

    text = f"name: big\nmodel: builtin:tiny\nprompts: [a cow]\nseeds: {{start: 0, count: 500000}}\noutput: {tmp_path}\n"
    (tmp_path / "job.yaml").write_text(text + "width: 512\nheight: 512\nsteps: 20\n")
    settings = Settings(broker_url=redis_url)
    before = prepare(tmp_path / "job.yaml", cuda=False, settings=settings, rate_of=rates.from_broker(settings))
    assert before.chunk_cells == 150  # nothing published: the assumed 0.5 cells/s
    client = redis.Redis.from_url(redis_url)
    work = rates.cell_work((512, 512), 20)  # this job's cells: 512² at 20 steps, one unit each
    assert work == 1.0
    assert rates.publish(client, before.model, "float32", 12 * work, 120.0) == 0.1  # a worker: 12 cells in 120 s
    plan = prepare(tmp_path / "job.yaml", cuda=False, settings=settings, rate_of=rates.from_broker(settings))
    assert plan.chunk_cells == 30 and len(next(plan.chunks()).cells) == 30  # 300 s at 0.1 cells/s
    # the same worker's rate sizes a job of costlier cells by their cost: 1024² (x4) at 40 steps (x2)
    (tmp_path / "big.yaml").write_text(text.replace("name: big", "name: bigger") + "width: 1024\nheight: 1024\nsteps: 40\n")
    costly = prepare(tmp_path / "big.yaml", cuda=False, settings=settings, rate_of=rates.from_broker(settings))
    assert costly.chunk_cells == 3  # 300 s of a worker that renders 0.1 / 8 of these a second
    operator = Settings(broker_url=redis_url, worker_rate=0.2)  # GRIDRENDER_WORKER_RATE wins over the measured rate
    assert prepare(tmp_path / "job.yaml", cuda=False, settings=operator, rate_of=rates.from_broker(operator)).chunk_cells == 60
    rates.publish(client, plan.model, "float32", 100, 1.0)  # faster workers later on...
    again = Plan.from_resolved(plan.job, plan.resolved())  # ...change nothing for this submission's chunks
    assert again.partition == plan.partition and next(again.chunks()).id == next(plan.chunks()).id
    # and a resubmit of the same job keeps the split, so it finds that submission's progress records
    resubmit = prepare(tmp_path / "job.yaml", cuda=False, settings=settings, rate_of=rates.from_broker(settings))
    assert resubmit.chunk_cells != plan.chunk_cells
    kept = resubmit.keeping_chunks_of(plan.resolved())
    assert kept.chunk_cells == plan.chunk_cells and kept.partition == plan.partition
    changed = prepare(tmp_path / "big.yaml", cuda=False, settings=settings, rate_of=rates.from_broker(settings))
    assert changed.keeping_chunks_of(plan.resolved()) is changed  # another job: sized afresh
    client.close()
