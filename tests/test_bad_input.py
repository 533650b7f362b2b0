"""Bad input: every malformed job file is refused with exit 2, named, and leaves no trace."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gridrender.cli import app
from gridrender.scheduler.errors import JobError
from gridrender.scheduler.jobfile import parse_job
from tests.conftest import ROOT

BAD = sorted((ROOT / "tests" / "data" / "bad").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


def test_the_corpus_has_at_least_40_files():
    assert len(BAD) >= 40


@pytest.fixture
def sandbox(tmp_path, monkeypatch, redis_url):
    """Default output and broker point at places this test can inspect."""
    from gridrender.scheduler.broker import shared_app

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("GRIDRENDER_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("GRIDRENDER_BROKER_URL", redis_url)
    shared_app.cache_clear()
    yield tmp_path / "out", redis.Redis.from_url(redis_url)
    shared_app.cache_clear()


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_each_bad_file_is_refused_by_every_command(path, sandbox):
    output, broker = sandbox
    runner = CliRunner()
    expected = expectation(path)
    for command in ("validate", "run", "submit"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 2, (command, result.output)
        assert expected in result.output, (command, expected, result.output)
        assert "Traceback" not in result.output
    assert not output.exists()  # nothing written
    assert broker.dbsize() == 0  # nothing enqueued
    assert not Path("/tmp/gridrender-pwned").exists()


@pytest.mark.usefixtures("sandbox")
def test_oversized_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: bad\nmodel: builtin:tiny\nprompts:\n" + "  - a prompt that goes on and on\n" * 40_000)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "at most" in result.output


@pytest.mark.usefixtures("sandbox")
def test_missing_job_file(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.output


KEYS = [
    "name",
    "model",
    "revision",
    "dtype",
    "prompts",
    "negative_prompt",
    "clip_skip",
    "seeds",
    "sampler",
    "steps",
    "guidance",
    "width",
    "height",
    "size",
    "batch_size",
    "output",
    "sheet",
    "bogus",
]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=10))
def test_random_documents_raise_only_job_errors(document):
    text = yaml.safe_dump(document, allow_unicode=True)
    with contextlib.suppress(JobError):  # any other exception fails the test
        parse_job(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!|>'\"#%@`\n\t 0123456789.~?")), max_size=200))
def test_random_yaml_text_raises_only_job_errors(text):
    with contextlib.suppress(JobError):  # any other exception fails the test
        parse_job(text)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_job_errors(raw):
    with contextlib.suppress(JobError):  # any other exception fails the test
        parse_job(raw)


@pytest.mark.usefixtures("sandbox")
def test_a_template_of_ten_billion_prompts_is_counted_not_expanded(tmp_path):
    """10**10 prompts from a 200-byte prompt: refused on the key within seconds, none of them expanded."""
    import time

    prompt = " ".join(["{a|b}"] * 29 + ["{2$$x|y|{z|w}}", "__colors__"])  # nested groups, k$$ picks, a wildcard
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "colors.txt").write_text("red\nblue\n")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "model": "builtin:tiny", "prompts": [prompt]}))
    assert len(prompt) < 200
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(path)], env={"GRIDRENDER_WILDCARD_DIR": str(tmp_path / "wildcards")})
    assert result.exit_code == 2, result.output
    assert "prompts.0: the template expands to 10,737,418,240 prompts" in result.output, result.output
    assert "prompt_samples" in result.output
    assert time.perf_counter() - started < 10


@pytest.mark.usefixtures("sandbox")
def test_prompt_samples_over_the_limit_are_refused_before_drawing(tmp_path):
    """prompt_samples: N drew N x 20 prompts per template before the cell limit was checked."""
    import time

    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump({"name": "bad", "model": "builtin:tiny", "prompts": [" ".join(["{a|b}"] * 24)], "prompt_samples": 100_000})
    )
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(path)], env={"GRIDRENDER_MAX_CELLS": "5000"})
    assert result.exit_code == 2, result.output
    assert "prompts.0: prompt_samples: 100,000 more prompts put the job over the limit of 5,000 cells" in result.output
    assert time.perf_counter() - started < 10  # drawing 2,000,000 prompts took minutes


@pytest.mark.usefixtures("sandbox")
def test_messages_print_prompts_literally_never_as_markup(tmp_path):
    """Rich markup ate `[worst quality]` and crashed on `[/x]` (exit 1, a traceback): text prints as written."""
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        yaml.safe_dump(
            {
                "name": "fine",
                "model": "builtin:tiny",
                "prompts": ["a cow [/x], [worst quality] :cow:"],
                "negative_prompt": "[bold]lowres[/bold]",
            }
        )
    )
    result = CliRunner().invoke(app, ["validate", str(fine)])
    assert result.exit_code == 0, result.output
    assert "'a cow [/x], [worst quality] :cow:'" in result.output and "'[bold]lowres[/bold]'" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "model": "builtin:tiny", "prompts": ["[a:b:0.5] [/x] [red]"]}))
    for command in ("validate", "run", "submit"):
        result = CliRunner().invoke(app, [command, str(bad)])
        assert result.exit_code == 2, (command, result.output)
        assert "prompts.0: prompt editing '[a:b:0.5]' ([from:to:when])" in result.output, result.output
        assert "escape the brackets as \\[ \\] for literal text" in result.output and "Traceback" not in result.output
