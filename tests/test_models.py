"""Models: builtin:tiny, a local diffusers folder, a single .safetensors file, a hub id."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from gridrender.scheduler.errors import JobError, ModelError
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import resolve
from gridrender.scheduler.plan import prepare
from tests.support.singlefile import write_single_file


def _cell(model, **kw):
    params = dict(
        prompt="a red barn",
        negative_prompt="blurry",
        clip_skip=2,
        seed=3,
        sampler="DPM++ 2M Karras",
        steps=3,
        guidance=6.0,
        width=64,
        height=64,
        dtype="float32",
    )
    return make_cell(model, **{**params, **kw})


def _pixels(renderer, model):
    return np.asarray(renderer.render(model, [_cell(model)])[0].image).astype(int)


def test_builtin_tiny_is_a_real_sd_pipeline_with_12_clip_layers(renderer, tiny):
    pipe = renderer.cache.get(tiny, "float32").pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert tiny.clip_layers == 12 and tiny.revision == "tiny-v1"
    # our byte-level vocabulary: one token per character, words split on spaces, plus BOS/EOS
    assert len(pipe.tokenizer("a cow").input_ids) == 2 + len("acow")
    image = renderer.render(tiny, [_cell(tiny)])[0].image
    assert image.size == (64, 64) and np.asarray(image).std() > 5  # not a flat colour


def test_builtin_weights_are_the_same_every_time(tiny_folder):
    """Weights come from a seeded PCG64 stream: rebuilding gives the saved tensors bit for bit."""
    from safetensors.torch import load_file

    from gridrender.workers import builtin

    saved = load_file(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    rebuilt = builtin.build("tiny").unet.state_dict()
    assert saved.keys() == rebuilt.keys()
    assert all(torch.equal(saved[k], rebuilt[k]) for k in saved)


def test_local_folder_loads_and_renders_like_the_builtin(renderer, tiny, tiny_folder):
    folder = resolve(str(tiny_folder))
    assert folder.kind == "folder" and folder.clip_layers == 12 and len(folder.sha256) == 64
    assert (_pixels(renderer, folder) == _pixels(renderer, tiny)).all()


def test_single_safetensors_file_loads_offline_with_identical_pixels(renderer, tiny, tiny_folder, tmp_path):
    path = write_single_file(tiny_folder, tmp_path / "tiny-sd.safetensors")
    model = resolve(str(path))
    assert model.kind == "file" and model.config == "tiny" and model.clip_layers == 12
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.short_hash() == model.sha256[:10]
    assert (_pixels(renderer, model) == _pixels(renderer, tiny)).all()
    # the cell id follows the file's content, not its path
    moved = tmp_path / "elsewhere.safetensors"
    path.rename(moved)
    assert _cell(resolve(str(moved))).id == _cell(model).id


def test_model_dir_is_searched(tmp_path, tiny_folder, monkeypatch):
    import shutil

    shutil.copytree(tiny_folder, tmp_path / "models" / "my-sd")
    monkeypatch.setenv("GRIDRENDER_MODEL_DIR", str(tmp_path / "models"))
    assert resolve("my-sd").kind == "folder"


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve("someone/some-model", "v1.0")


def test_hub_id_pinned_to_a_commit_resolves_from_the_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--someone--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    config = repo / "snapshots" / ("a" * 40) / "text_encoder" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"num_hidden_layers": 12}')
    (config.parent.parent / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    model = resolve("someone/some-model")
    assert model.kind == "hub" and model.revision == "a" * 40 and model.clip_layers == 12
    assert model.identity() == {"kind": "hub", "name": "someone/some-model", "revision": "a" * 40}
    config.unlink()  # a cache that lacks the text encoder's config: a clear error, not a guessed 12 layers
    with pytest.raises(ModelError, match=r"text_encoder/config\.json"):
        resolve("someone/some-model")


def test_bad_model_references_name_the_model_key(job_file):
    for bad in ("builtin:huge", "./no/such/file.safetensors"):
        with pytest.raises(JobError) as info:
            prepare(job_file(model=bad), cuda=False)
        assert [p.field for p in info.value.problems] == ["model"]
        assert info.value.problems[0].line == 2


def test_file_hashes_are_cached_on_disk_per_size_and_mtime(tmp_path, monkeypatch):
    from gridrender.scheduler import weightfiles

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(weightfiles, "_HASH_CACHE", None)
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"x" * 100)
    first = weightfiles.file_sha256(weights)
    assert first == hashlib.sha256(b"x" * 100).hexdigest()
    assert first in (tmp_path / "cache" / "gridrender" / "sha256.json").read_text()
    monkeypatch.setattr(weightfiles, "_HASH_CACHE", None)  # a new process reads the file
    monkeypatch.setattr(weightfiles, "_hash_file", lambda _p: pytest.fail("hashed again"))
    assert weightfiles.file_sha256(weights) == first
    weights.write_bytes(b"y" * 100)  # changed content, new size/mtime: hashed anew
    monkeypatch.setattr(weightfiles, "_hash_file", lambda _p: "new")
    assert weightfiles.file_sha256(weights) == "new"


def test_a_folder_laid_out_by_other_tools_loads(renderer, tiny, tiny_folder, tmp_path):
    """Older transformers' layout (pytorch_model.bin, `text_model.` keys) and a
    model_index.json that lists a safety checker and feature extractor it lacks."""
    import json
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "foreign"
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns(".complete"))
    encoder = folder / "text_encoder"
    state = load_file(encoder / "model.safetensors")
    torch.save({"text_model." + k: v for k, v in state.items()}, encoder / "pytorch_model.bin")
    (encoder / "model.safetensors").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    model = resolve(str(folder))
    assert (_pixels(renderer, model) == _pixels(renderer, tiny)).all()


@pytest.mark.parametrize(
    "keys, says",
    [
        (
            {
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
                "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
            },
            "SDXL",
        ),
        (
            {
                "cond_stage_model.model.token_embedding.weight": [49408, 1024],
                "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
            },
            "SD 2",
        ),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320]}, "LoRA"),
        (
            {
                "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": [3840, 1280],
                "model.diffusion_model.input_blocks.0.0.weight": [384, 4, 3, 3],
            },
            "SDXL refiner",
        ),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [4608, 1536]}, "SD3"),
        ({"double_blocks.0.img_attn.qkv.weight": [9216, 3072]}, "Flux"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": [9216, 3072]}, "Flux"),
        # A1111's sd_models_config.guess_model_config_from_state_dict: input_blocks.0.0 with 9 input channels
        # is an inpainting model (SDXL's too), 8 instruct-pix2pix; no txt2img config fits them
        (
            {
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
                "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280],
                "model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3],
            },
            "inpainting",
        ),
        (
            {
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
                "model.diffusion_model.input_blocks.0.0.weight": [320, 8, 3, 3],
            },
            "instruct-pix2pix",
        ),
    ],
)
def test_a_safetensors_file_that_is_not_sd1_is_bad_input(job_file, tmp_path, keys, says):
    import json
    import struct

    from tests.conftest import cli

    header = json.dumps({k: {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in keys.items()}).encode()
    path = tmp_path / "not-sd1.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    result = cli("validate", str(job_file(model=str(path))))
    assert result.returncode == 2 and "model" in result.stderr and says in result.stderr, result.stderr


def test_single_file_and_folder_records_reproduce(tiny_folder, job_file, tmp_path):
    import json

    from tests.conftest import cli

    single = write_single_file(tiny_folder, tmp_path / "tiny-sd.safetensors")
    for n, model in enumerate((str(single), str(tiny_folder))):
        path = job_file(
            f"job{n}.yaml", model=model, seeds=[4], clip_skip=[2], sampler="DPM++ SDE Karras", output=str(tmp_path / f"out{n}")
        )
        assert cli("run", str(path)).returncode == 0
        (record,) = (tmp_path / f"out{n}" / "cells").glob("*.json")
        assert json.loads(record.read_text())["model"]["kind"] == ("file" if n == 0 else "folder")
        again = cli("reproduce", str(record))
        assert again.returncode == 0 and "max pixel difference 0/255" in again.stdout, again.stdout + again.stderr
        # a changed file is refused, never rendered under the recorded id
        changed = tmp_path / f"changed{n}"
        if n == 0:
            single.write_bytes(single.read_bytes() + b" ")
        else:
            import shutil

            shutil.copytree(tiny_folder, changed)
            (changed / "model_index.json").write_text((changed / "model_index.json").read_text() + "\n")
            data = json.loads(record.read_text())
            data["model"]["source"] = str(changed)
            record.write_text(json.dumps(data))
        refused = cli("reproduce", str(record))
        assert refused.returncode == 2 and "not the recorded one" in refused.stderr, refused.stderr


def test_a_model_file_replaced_mid_job_fails_its_cells_on_the_next_load(renderer, tiny, tiny_folder, tmp_path):
    """The worker evicts the model, the file is replaced on disk (same size, mtime set back), the next
    chunk reloads it: the sha256 is checked again on that load, the cells fail, nothing is stored."""
    import os

    from safetensors.torch import load_file, save_file

    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import ChunkJob, Writer, render_and_store

    path = write_single_file(tiny_folder, tmp_path / "model.safetensors")
    model = resolve(str(path))
    store, writer = LocalStore(tmp_path / "out"), Writer()
    try:
        first = render_and_store(renderer, writer, store, ChunkJob("t", model, [_cell(model, seed=1)], 1))
        assert first.failed == {} and len(first.stored) == 1
        renderer.render(tiny, [_cell(tiny)])  # another model's chunk: this one is evicted (one resident)
        original, stat = path.read_bytes(), path.stat()
        tensors = load_file(path)
        name = next(k for k in tensors if k.endswith("conv_out.bias"))
        tensors[name] = tensors[name] + 1  # other weights, same shapes: the same size on disk
        save_file(tensors, str(path))
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the mtime says nothing changed
        again = render_and_store(renderer, writer, store, ChunkJob("t", model, [_cell(model, seed=2)], 1))
        (why,) = again.failed.values()
        assert "changed on disk" in why and model.sha256 in why and again.stored == []
        assert len(list((tmp_path / "out" / "cells").glob("*.png"))) == 1
        path.write_bytes(original)  # the submitted file back: it renders again
        assert render_and_store(renderer, writer, store, ChunkJob("t", model, [_cell(model, seed=2)], 1)).failed == {}
    finally:
        writer.close()
