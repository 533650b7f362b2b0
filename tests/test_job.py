"""Job files: every key of DESIGN.md, lists as axes, errors with key and line."""

from __future__ import annotations

import pytest

from gridrender.scheduler.errors import JobError
from gridrender.scheduler.job import MAX_SEED
from gridrender.scheduler.jobfile import parse_job
from gridrender.scheduler.settings import Settings
from tests.conftest import cli

DESIGN_EXAMPLE = b"""\
name: cow-clip-skip            # [a-z0-9][a-z0-9_-]*, names the job
model: builtin:tiny            # hub id, local diffusers folder, single .safetensors/.ckpt file, or builtin:*
revision: null                 # hub revision to pin (recorded as the resolved commit)
dtype: auto                    # auto | float16 | bfloat16 | float32 (auto: fp16 on CUDA, fp32 on CPU)
prompts:
  - a cow standing in a field
  - 1girl, solo, looking at viewer
negative_prompt: lowres, blurry
clip_skip: [1, 2]              # A1111/civitai convention, see below
seeds: [1, 2, 3, 4]            # or {start: 0, count: 1000}
sampler: Euler a                # A1111 names ("DPM++ 2M Karras") or diffusers class names
steps: 25
guidance: 7.0
width: 512
height: 512
batch_size: 4                  # cells rendered together in one pipeline call
output: ./renders              # a local folder, or s3://bucket/prefix
"""


def test_design_example_parses_into_a_16_cell_grid():
    job = parse_job(DESIGN_EXAMPLE)
    assert job.cell_count() == 2 * 2 * 4
    assert job.sizes == [(512, 512)]
    assert job.sampler == ["Euler a"]
    assert job.negative_prompt == ["lowres, blurry"]


def test_every_axis_may_be_a_list_and_the_grid_is_their_product():
    job = parse_job(
        b"name: g\nmodel: builtin:tiny\nprompts: [a, b, c]\nnegative_prompt: [x, y]\nclip_skip: [1, 2]\n"
        b"seeds: {start: 10, count: 5}\nsampler: [Euler, DDIMScheduler]\nsteps: [4, 8]\nguidance: [5, 7.5]\n"
        b"size: [[64, 64], [128, 64]]\n"
    )
    assert job.cell_count() == 3 * 2 * 2 * 5 * 2 * 2 * 2 * 2
    assert list(job.seed_list) == [10, 11, 12, 13, 14]
    assert job.guidance == [5.0, 7.5]
    assert job.sizes == [(64, 64), (128, 64)]


def test_sampler_names_are_canonicalised():
    job = parse_job(b"name: g\nmodel: builtin:tiny\nprompts: a\nsampler: [euler  A, dpm++ 2m karras, DDIMScheduler]\n")
    assert job.sampler == ["Euler a", "DPM++ 2M Karras", "DDIMScheduler"]


def test_random_seed_is_drawn_once_and_kept():
    job = parse_job(b"name: g\nmodel: builtin:tiny\nprompts: a\nseeds: [5, -1, -1]\n").with_random_seeds_drawn()
    assert job.seed_list[0] == 5
    assert all(0 <= s <= MAX_SEED for s in job.seed_list)
    assert len(set(job.seed_list)) == 3
    assert job.normalized()["seeds"] == job.seed_list


def test_all_errors_at_once_with_key_and_line():
    bad = b"""\
name: Bad Name
model: builtin:tiny
prompts: []
clip_skip: [0]
seeds: {start: 0, count: 0}
steps: -3
width: 500
sampler: Warp Drive
colour: blue
"""
    with pytest.raises(JobError) as info:
        parse_job(bad, "bad.yaml")
    lines = str(info.value).splitlines()
    expected = {
        ("name", 1),
        ("prompts", 3),
        ("clip_skip.0", 4),
        ("seeds.count", 5),
        ("steps.0", 6),
        ("width", 7),
        ("sampler", 8),
        ("colour", 9),
    }
    found = {(p.field, p.line) for p in info.value.problems}
    assert expected <= found, lines
    assert all(line.startswith("bad.yaml: line ") for line in lines)
    assert "divisible by 8, got 500" in str(info.value)
    assert "Euler a" in str(info.value)  # the unknown sampler lists the valid ones
    assert "unknown key" in str(info.value)


@pytest.mark.parametrize(
    "text, field",
    [
        (b"name: a\nname: b\nmodel: builtin:tiny\nprompts: x\n", "name"),
        (b"name: a\nmodel: builtin:tiny\nprompts: x\nsteps: '25'\n", "steps.0"),
        (b"name: a\nmodel: builtin:tiny\nprompts: x\nguidance: [true]\n", "guidance.0"),
        (b"name: a\nmodel: builtin:tiny\nprompts: x\nsize: [[64, 64]]\nwidth: 64\n", "size"),
        (b"name: a\nmodel: builtin:tiny\nprompts: x\nseeds: [1, 1]\n", "seeds"),
        (b"name: a\nmodel: builtin:tiny\nprompts: x\ndtype: float64\n", "dtype"),
        (b"name: a\nprompts: x\n", "model"),
    ],
)
def test_wrong_types_and_values_name_the_key(text, field):
    with pytest.raises(JobError) as info:
        parse_job(text)
    assert field in {p.field for p in info.value.problems}
    assert all(p.line for p in info.value.problems if p.field != "model")


@pytest.mark.parametrize(
    "text, needle",
    [
        (b"name: a\nmodel: x\nprompts: [unclosed\n", "YAML"),
        (b"!!python/object/apply:os.system ['touch /tmp/pwned']\n", "constructor"),
        (b"\xff\xfe\x00", "UTF-8"),
        (b"- just\n- a list\n", "mapping"),
        (b"", "empty"),
    ],
)
def test_unparseable_files_are_job_errors(text, needle):
    with pytest.raises(JobError) as info:
        parse_job(text)
    assert needle in str(info.value)


def test_grid_over_the_cell_limit_is_refused():
    text = b"name: a\nmodel: builtin:tiny\nprompts: x\nseeds: {start: 0, count: 2000}\n"
    with pytest.raises(JobError, match="over the limit of 1,000"):
        parse_job(text, settings=Settings(max_cells=1000))


def test_validate_prints_axes_and_cell_count(job_file):
    result = cli("validate", str(job_file()))
    assert result.returncode == 0, result.stderr
    assert "4 cells" in result.stdout
    assert "clip_skip" in result.stdout and "varies" in result.stdout
    assert "sampler" in result.stdout and "locked" in result.stdout


def test_validate_rejects_with_exit_2_and_writes_nothing(job_file, tmp_path):
    path = job_file(steps=0, bogus=1)
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "steps.0" in result.stderr and "bogus" in result.stderr and "line" in result.stderr
    result = cli("run", str(path))
    assert result.returncode == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "template",
    [
        "{a|b} {c|d|e}",
        "{a|{b|c}}",
        "{2$$a|b|c}",
        "{1-2$$a|b|c}",
        "{0-2$$a|b}",
        "{2$$a|{b|c}|d}",
        "__colors__",
        "__animals__ and {x|y}",
        "{2$$__colors__}",
        "{~a|b} {c|d}",
        "${v={a|b}} ${v} ${v}",
        "${v=!{a|b}} ${v} ${v}",
        "plain",
    ],
)
def test_templates_are_counted_as_the_library_expands_them(template, tmp_path):
    from dynamicprompts.generators import CombinatorialPromptGenerator
    from dynamicprompts.wildcards import WildcardManager

    from gridrender.scheduler.dynamic import count_variants

    (tmp_path / "colors.txt").write_text("red\nblue\n{light|dark} green\n")
    (tmp_path / "animals.txt").write_text("cat\ndog\n__colors__ bird\n")
    wildcards = WildcardManager(tmp_path)
    expanded = CombinatorialPromptGenerator(wildcards).generate(template, max_prompts=None)
    assert count_variants(template, wildcards, cap=10**6) == len(expanded)
    assert count_variants(template, wildcards, cap=2) == min(2, len(expanded))


def test_template_prompts_share_the_cell_limit_with_the_other_axes():
    text = b"name: a\nmodel: builtin:tiny\nprompts: ['{a|b} {c|d} {e|f}']\nseeds: {start: 0, count: 200}\n"
    assert parse_job(text, settings=Settings(max_cells=1600)).cell_count() == 1600
    with pytest.raises(JobError, match=r"prompts\.0: the template expands to 8 prompts.*over the limit of 1,000"):
        parse_job(text, settings=Settings(max_cells=1000))
