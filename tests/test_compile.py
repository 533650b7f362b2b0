"""torch.compile on CPU (inductor's C++ backend): static shapes, a warm cache across processes.

The GPU figures live in BENCHMARKS.md (bench/gpu.py); what these show holds on any
device: a short last batch is padded and never recompiles, a second process with
the same cache directory loads the compiled graphs instead of compiling them, and
`--no-compile` runs eager.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

# inductor's C++ compile of the UNet and the VAE decoder takes minutes on a loaded 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def probes(tmp_path_factory, private_cache, tiny_folder):
    """Two fresh processes compiling the same chunk with one cache directory."""
    from tests.support.components import write_lora

    folder = tmp_path_factory.mktemp("compile")
    lora = write_lora(folder / "detail.safetensors", tiny_folder, seed=1, kohya=True)
    env = {
        "GRIDRENDER_CACHE_DIR": str(folder / "cache"),
        "XDG_CACHE_HOME": str(private_cache),
        "HF_HUB_OFFLINE": "1",
        "PATH": __import__("os").environ["PATH"],
    }
    runs = []
    for n in range(2):
        out = folder / f"probe{n}.npz"
        result = subprocess.run(
            [sys.executable, "-m", "tests.support.compile_probe", str(out), str(lora)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append((json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)))
    return runs


def test_a_short_last_batch_is_padded_and_never_recompiles(probes):
    report, _ = probes[0]
    assert report["rendered"] == 5 and not report["failed"]
    assert report["after_first"]["graphs"] >= 1
    assert report["end"]["graphs"] == report["after_first"]["graphs"], "a new shape compiled a new graph"
    assert report["record_batch"] == [4] * 5  # the short batch ran padded to the job's batch size
    assert all(c == {"unet": "default", "vae_decode": "default"} for c in report["record_compile"])


def test_padding_gives_the_same_image_as_an_unpadded_batch(probes):
    _, images = probes[0]
    assert np.array_equal(images["padded_last"], images["in_full_batch"])  # one shape, one kernel: bit for bit
    # and compiled stays within 1/255 of eager alone
    assert np.abs(images["first"].astype(int) - images["alone"][:4].astype(int)).max() <= 1
    assert np.abs(images["padded_last"].astype(int) - images["alone"][4].astype(int)).max() <= 1


def test_a_second_process_with_the_same_cache_skips_compilation(probes):
    (cold, cold_images), (warm, warm_images) = probes
    assert cold["after_first"]["fxgraph_cache_miss"] >= 1
    assert warm["after_first"]["fxgraph_cache_hit"] >= 1 and warm["after_first"]["fxgraph_cache_miss"] == 0
    assert warm["first_seconds"] < cold["first_seconds"] / 2
    assert np.array_equal(cold_images["first"], warm_images["first"])


def test_merged_loras_run_in_the_compiled_unet_without_recompiling(probes):
    """Weights change in place, so the compiled graphs stay valid: no recompile, the eager images."""
    for report, images in probes:
        assert report["lora_state"]["unet"] == "default", report
        assert set(report["lora_graphs"]) == {report["end"]["graphs"]}, report  # no LoRA set compiled a graph
        compiled, eager = images["lora_compiled"].astype(int), images["lora_eager"].astype(int)
        assert np.abs(compiled - eager).max() <= 1
        assert np.abs(compiled[1] - compiled[0]).max() > 3 and np.abs(compiled[2] - compiled[1]).max() > 0
        assert np.array_equal(compiled[3], compiled[0])  # unloaded: the base image again


def test_no_compile_runs_eager_even_where_compiling_is_forced(cluster, job_file):
    cluster.worker(None, "--no-compile", GRIDRENDER_COMPILE="on")
    path = job_file(output=cluster.output, seeds=[1], clip_skip=1, dtype="float32", steps=2)
    result = cluster.cli("submit", str(path), "--wait", GRIDRENDER_COMPILE="on")
    assert result.returncode == 0, result.stderr
    (key,) = [k for k in cluster.keys() if k.endswith(".json")]  # noqa: SIM118  (a method of the cluster fixture)
    record = json.loads(cluster.s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read())
    assert record["compile"] == {"unet": "eager", "vae_decode": "eager"}
    assert "compiled the" not in cluster.workers[0].text()
