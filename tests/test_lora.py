"""LoRA files as users download them, applied as A1111 applies them.

References are written here from the upstream formulas, not from gridrender: kohya's
LoRA/LoCon (ΔW = up·down, scaled by alpha/rank), LyCORIS's own functions for LoHa and
LoKr (lycoris.functional, imported without the package's heavy __init__), A1111's DoRA
(extensions-builtin/Lora/network.py apply_weight_decompose: the merged weight rescaled
to `dora_scale` per input column, then W + m·(W' − W)), PEFT's alpha / r.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from gridrender.scheduler.components import LoraUse, resolve_lora
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import ModelSpec, resolve
from gridrender.scheduler.prompts import LoraTag, lora_tags
from gridrender.scheduler.settings import Settings
from tests.conftest import cli
from tests.support import loras as build

TE, UNET_M = 0.7, 1.3  # distinct multipliers: text-encoder layers take TE, UNet layers UNET_M
RANK, ALPHA = 4, 2.0
# builtin:tiny's layers, as kohya names SD 1.x's (the diffusers UNet's paths)
LINEAR = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.resnets.0.time_emb_proj",
)
CONV3 = (
    "down_blocks.2.resnets.0.conv1",
    "up_blocks.0.upsamplers.0.conv",
    "down_blocks.0.downsamplers.0.conv",
    "mid_block.resnets.1.conv2",
)
CONV1 = ("down_blocks.2.resnets.0.conv_shortcut", "down_blocks.0.attentions.0.proj_in")
TEXT = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.3.mlp.fc1", "encoder.layers.11.self_attn.out_proj")
KINDS = ("lora", "locon", "loha", "lokr", "dora", "full", "peft", "peft_dora")


def lycoris() -> tuple[Any, Any]:
    """lycoris.functional's loha and lokr, without running lycoris/__init__ (it imports transformers, peft, ...)."""
    if "lycoris" not in sys.modules:
        spec = importlib.util.find_spec("lycoris")
        if spec is None:
            pytest.skip("lycoris-lora is not installed (pip install -e '.[dev]')")
        package = importlib.util.module_from_spec(spec)
        sys.modules["lycoris"] = package
    from lycoris.functional import loha, lokr

    return loha, lokr


def roots(pipe: Any) -> dict[str, torch.nn.Module]:
    out = {"unet": pipe.unet, "text_encoder": getattr(pipe.text_encoder, "text_model", pipe.text_encoder)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = getattr(pipe.text_encoder_2, "text_model", pipe.text_encoder_2)
    return out


def snapshot(pipe: Any) -> dict[tuple[str, str], torch.Tensor]:
    return {(c, name): p.detach().clone() for c, root in roots(pipe).items() for name, p in root.named_parameters()}


def weight(pipe: Any, component: str, path: str) -> torch.Tensor:
    return roots(pipe)[component].get_submodule(path).weight


# -- the reference: each layout's update, from the formulas ----------------------------------


def reference(kind: str, parts: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """U such that the merged weight is W + multiplier · U."""
    shape = base.shape
    if kind == "peft_dora":  # PEFT's DoRA: its own weight norm (per output row) and merge rule
        from peft.tuners.lora.dora import DoraLinearLayer

        scale = ALPHA / RANK
        delta = parts["lora_up.weight"] @ parts["lora_down.weight"]
        norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(base, delta, scaling=scale)
        return (parts["magnitude"] / norm).view(-1, 1) * (base + scale * delta) - base
    if kind in ("lora", "locon", "dora", "peft"):
        up, down = (
            parts.get("lora_up.weight", parts.get("lora_B.weight")),
            parts.get("lora_down.weight", parts.get("lora_A.weight")),
        )
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0  # no alpha: 1 (network.py)
        if "lora_mid.weight" in parts:
            delta = torch.einsum("on,nmkl,mi->oikl", up.flatten(1), parts["lora_mid.weight"], down.flatten(1))
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        delta = scale * delta
        if kind != "dora":
            return delta
        merged = base + delta  # DoRA: each input column rescaled to its trained magnitude
        column = torch.linalg.vector_norm(merged, dim=[d for d in range(merged.dim()) if d != 1], keepdim=True)
        return merged / column * parts["dora_scale"] - base
    if kind == "loha":
        loha, _ = lycoris()
        scale = float(parts["alpha"]) / parts["hada_w1_b"].shape[0]
        return loha.diff_weight(
            parts["hada_w1_b"],
            parts["hada_w1_a"],
            parts["hada_w2_b"],
            parts["hada_w2_a"],
            parts.get("hada_t1"),
            parts.get("hada_t2"),
            gamma=scale,
            backend="torch",
        ).reshape(shape)
    if kind == "lokr":
        _, lokr = lycoris()
        rank = (
            parts["lokr_w2_b"].shape[0]
            if "lokr_w2_b" in parts
            else (parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None)
        )
        scale = float(parts["alpha"]) / rank if rank else 1.0  # LyCORIS: whole w1 and w2 are unscaled
        return lokr.kron_weight(
            parts.get("lokr_w1"),
            parts.get("lokr_w1_a"),
            parts.get("lokr_w1_b"),
            parts.get("lokr_w2"),
            parts.get("lokr_w2_a"),
            parts.get("lokr_w2_b"),
            parts.get("lokr_t2"),
            scale=scale,
            backend="torch",
        ).reshape(shape)
    if kind == "full":
        return parts["diff"]
    raise ValueError(kind)


Case = dict[tuple[str, str], tuple[str, dict[str, torch.Tensor]]]  # (component, path) -> (kind, parts)


@dataclass
class _CaseBuilder:
    """Builds one layout's layers over builtin:tiny, in the draw order of the random generator."""

    pipe: Any
    rng: torch.Generator
    layers: dict[str, build.Parts] = field(default_factory=dict)
    case: Case = field(default_factory=dict)

    @property
    def targets(self) -> list[tuple[str, str]]:
        return [("unet", p) for p in LINEAR] + [("text_encoder", p) for p in TEXT]

    def add(self, component: str, path: str, layer_kind: str, parts: build.Parts) -> None:
        key = build.kohya_unet_sd1(path) if component == "unet" else build.kohya_te_sd1(path)
        self.layers[key] = parts
        self.case[(component, path)] = (layer_kind, parts)

    def shape(self, component: str, path: str) -> tuple[int, ...]:
        return tuple(weight(self.pipe, component, path).shape)

    def lora(self) -> None:
        for component, path in self.targets:
            self.add(component, path, "lora", build.lora(self.shape(component, path), RANK, self.rng, ALPHA))

    def peft_dora(self) -> None:
        targets = self.targets
        for component, path in targets[:3] + targets[-2:]:
            parts = build.lora(self.shape(component, path), RANK, self.rng, ALPHA)
            rows = weight(self.pipe, component, path).detach().norm(dim=1)
            magnitude = rows * (1 + 0.2 * torch.rand(len(rows), generator=self.rng))
            self.add(component, path, "peft_dora", {**parts, "magnitude": magnitude})

    def locon(self) -> None:
        rng = self.rng
        for path in (*CONV3, *CONV1):
            self.add("unet", path, "locon", build.lora(self.shape("unet", path), RANK, rng, ALPHA))
        self.add("unet", CONV3[3], "locon", build.locon_tucker(self.shape("unet", CONV3[3]), RANK, rng, ALPHA))
        self.add("unet", LINEAR[0], "lora", build.lora(self.shape("unet", LINEAR[0]), RANK, rng))  # no alpha: scale 1

    def loha(self) -> None:
        rng, targets = self.rng, self.targets
        for component, path in targets[:3] + targets[-1:]:
            self.add(component, path, "loha", build.loha(self.shape(component, path), RANK, rng, ALPHA))
        self.add("unet", CONV3[0], "loha", build.loha(self.shape("unet", CONV3[0]), RANK, rng, ALPHA))
        self.add("unet", CONV3[1], "loha", build.loha(self.shape("unet", CONV3[1]), RANK, rng, ALPHA, tucker=True))

    def lokr(self) -> None:
        rng, shape = self.rng, self.shape
        self.add("unet", LINEAR[0], "lokr", build.lokr(shape("unet", LINEAR[0]), 4, 4, RANK, rng, ALPHA, "w2_factored"))
        self.add("unet", LINEAR[3], "lokr", build.lokr(shape("unet", LINEAR[3]), 4, 4, RANK, rng, ALPHA, "w1_factored"))
        self.add("text_encoder", TEXT[0], "lokr", build.lokr(shape("text_encoder", TEXT[0]), 4, 2, RANK, rng, ALPHA, "whole"))
        self.add("unet", CONV3[0], "lokr", build.lokr(shape("unet", CONV3[0]), 8, 4, RANK, rng, ALPHA, "whole"))
        self.add("unet", CONV3[3], "lokr", build.lokr(shape("unet", CONV3[3]), 8, 8, RANK, rng, ALPHA, "tucker"))

    def dora(self) -> None:
        targets = self.targets
        for component, path in [*targets[:2], ("unet", CONV3[0]), targets[-1]]:
            base = weight(self.pipe, component, path).detach()
            self.add(component, path, "dora", build.dora(tuple(base.shape), base, RANK, self.rng, ALPHA))

    def full(self) -> None:
        targets = self.targets
        norms = (("unet", "down_blocks.1.resnets.0.norm1"), ("text_encoder", "encoder.layers.2.layer_norm2"))
        for component, path in (targets[0], ("unet", CONV1[0]), targets[-1], *norms):  # A1111 patches norms too
            module = roots(self.pipe)[component].get_submodule(path)
            self.add(component, path, "full", build.full(self.shape(component, path), self.rng, bias=module.bias is not None))


# The builder of each layout's layers (PEFT's files hold kohya's LoRA layers, renamed).
_BUILDERS: dict[str, Callable[[_CaseBuilder], None]] = {
    "lora": _CaseBuilder.lora,
    "peft": _CaseBuilder.lora,
    "peft_dora": _CaseBuilder.peft_dora,
    "locon": _CaseBuilder.locon,
    "loha": _CaseBuilder.loha,
    "lokr": _CaseBuilder.lokr,
    "dora": _CaseBuilder.dora,
    "full": _CaseBuilder.full,
}


def sd1_case(kind: str, pipe: Any, seed: int) -> tuple[dict[str, build.Parts], Case, dict[str, str] | None]:
    """A file of one layout over builtin:tiny: its kohya/LyCORIS layers, and what each changes."""
    builder = _CaseBuilder(pipe, torch.Generator().manual_seed(seed))
    if kind in _BUILDERS:
        _BUILDERS[kind](builder)
    layers, case = builder.layers, builder.case
    if kind not in ("peft", "peft_dora"):
        return layers, case, None
    names = {build.kohya_unet_sd1(p) if c == "unet" else build.kohya_te_sd1(p): (c, p) for c, p in case}
    peft, metadata = build.kohya_to_peft(layers, names, ALPHA, RANK)  # <component>.<path>.lora_A.weight
    return peft, case, metadata


def write_case(kind: str, pipe: Any, folder: Path, seed: int = 1) -> tuple[Path, Case]:
    layers, case, metadata = sd1_case(kind, pipe, seed)
    return build.write(folder / f"{kind}.safetensors", layers, metadata), case


@pytest.fixture(scope="module")
def loaded(renderer: Any, tiny: ModelSpec) -> Any:
    return renderer.cache.get(tiny, "float32")


def merge(loaded: Any, uses: tuple[LoraUse, ...]) -> None:
    from gridrender.workers.components import use_loras

    use_loras(loaded.pipe, loaded.extras, uses)


# -- merged weights --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_layout_merges_the_formula_into_exactly_its_layers_and_unloads_bit_for_bit(kind, loaded, tiny, tmp_path):
    pipe = loaded.pipe
    merge(loaded, ())
    before = snapshot(pipe)
    path, case = write_case(kind, pipe, tmp_path)
    component = resolve_lora(str(path), tiny, Settings())
    merge(loaded, (LoraUse(component, TE, UNET_M, "x"),))
    after = snapshot(pipe)
    for (component_name, name), value in after.items():
        layer, _, tensor = name.rpartition(".")
        base = before[(component_name, name)]
        multiplier = TE if component_name == "text_encoder" else UNET_M
        if tensor == "weight" and (component_name, layer) in case:
            layer_kind, parts = case[(component_name, layer)]
            expected = base + multiplier * reference(layer_kind, parts, base)
            assert torch.allclose(value, expected, atol=2e-5, rtol=1e-4), (kind, layer)
            assert not torch.equal(value, base)
        elif tensor == "bias" and "diff_b" in case.get((component_name, layer), ("", {}))[1]:
            # network.py finalize_updown: ex_bias = diff_b times the multiplier (no scale), added to the bias
            expected = base + multiplier * case[(component_name, layer)][1]["diff_b"]
            assert torch.allclose(value, expected, atol=2e-5, rtol=1e-4), (kind, name)
            assert not torch.equal(value, base)
        else:
            assert torch.equal(value, base), (kind, name)  # nothing else moves
    merge(loaded, ())
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())


def test_several_loras_sum_and_switching_sets_never_drifts(loaded, tiny, tmp_path):
    pipe = loaded.pipe
    merge(loaded, ())
    before = snapshot(pipe)
    files = {kind: write_case(kind, pipe, tmp_path / kind, seed=i + 3) for i, kind in enumerate(("lora", "dora", "loha"))}
    second, second_case = write_case("lora", pipe, tmp_path / "again", seed=11)  # the same layers, other weights
    uses = {kind: resolve_lora(str(path), tiny, Settings()) for kind, (path, _) in files.items()}
    other = resolve_lora(str(second), tiny, Settings())
    merge(loaded, (LoraUse(uses["lora"], 0.5, 0.5, "a"), LoraUse(other, -0.8, 1.1, "b")))
    for (component, layer), (kind, parts) in files["lora"][1].items():
        base = before[(component, layer + ".weight")]
        m1, m2 = (0.5, -0.8) if component == "text_encoder" else (0.5, 1.1)
        expected = base + m1 * reference(kind, parts, base) + m2 * reference(*second_case[(component, layer)], base)
        assert torch.allclose(weight(pipe, component, layer), expected, atol=2e-5, rtol=1e-4), layer
    for chosen in (
        (LoraUse(uses["dora"], 1.0, 0.6, "d"),),
        (LoraUse(uses["loha"], 0.3, 0.3, "h"),),
        (LoraUse(uses["lora"], 1.0, 1.0, "a"), LoraUse(uses["loha"], 2.0, 2.0, "h")),
        (),
    ):
        merge(loaded, chosen)
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())


def test_two_doras_apply_one_after_the_other_each_on_the_weight_the_other_left(loaded, tiny, tmp_path):
    """networks.py network_apply_weights: for net in loaded_networks: updown = calc_updown(self.weight) on the
    weight as the previous network left it, so DoRA's renormalisation depends on the order."""
    pipe = loaded.pipe
    merge(loaded, ())
    before = snapshot(pipe)
    (first, case1), (second, case2) = (write_case("dora", pipe, tmp_path / n, seed=s) for n, s in (("a", 7), ("b", 8)))
    uses = [LoraUse(resolve_lora(str(p), tiny, Settings()), 0.9, 0.6, n) for p, n in ((first, "a"), (second, "b"))]
    for order in (uses, uses[::-1]):
        merge(loaded, tuple(order))
        cases = (case1, case2) if order[0] is uses[0] else (case2, case1)
        for key in case1:
            m = 0.9 if key[0] == "text_encoder" else 0.6
            expected = before[(key[0], key[1] + ".weight")]
            for case in cases:
                kind, parts = case[key]
                expected = expected + m * reference(kind, parts, expected)
            assert torch.allclose(weight(pipe, *key), expected, atol=2e-5, rtol=1e-4), key
    merge(loaded, ())
    assert all(torch.equal(value, before[k]) for k, value in snapshot(pipe).items())


def test_a_sweep_over_many_loras_keeps_few_in_memory_and_reads_one_again(loaded, tiny, tmp_path, monkeypatch):
    from gridrender.workers import components

    monkeypatch.setattr(components, "KEEP_LORAS", 2)
    pipe = loaded.pipe
    merge(loaded, ())
    before = snapshot(pipe)
    files = [write_case("lora", pipe, tmp_path / str(i), seed=20 + i) for i in range(4)]
    uses = [LoraUse(resolve_lora(str(path), tiny, Settings()), 1.0, 1.0, f"l{i}") for i, (path, _) in enumerate(files)]
    for use in uses:
        merge(loaded, (use,))
    assert len(loaded.extras.loras) == 2 and uses[0].lora.identity_key() not in loaded.extras.loras
    merge(loaded, (uses[0],))  # read from its file again
    for (component, layer), (kind, parts) in files[0][1].items():
        base = before[(component, layer + ".weight")]
        assert torch.allclose(weight(pipe, component, layer), base + reference(kind, parts, base), atol=2e-5), layer
    merge(loaded, ())
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())


def test_a_merge_that_fails_midway_leaves_the_base_weights_not_half_a_set(loaded, tiny, tmp_path):
    """A layer whose tensors do not multiply fails the chunk; the next chunk must find the base, not a part."""
    from gridrender.scheduler.components import Component
    from gridrender.workers import lora
    from gridrender.workers.components import use_loras

    pipe = loaded.pipe
    merge(loaded, ())
    before = snapshot(pipe)
    good, _ = write_case("lora", pipe, tmp_path / "good", seed=2)
    merge(loaded, (LoraUse(resolve_lora(str(good), tiny, Settings()), 1.0, 1.0, "good"),))
    network = loaded.extras.loras[resolve_lora(str(good), tiny, Settings()).identity_key()]
    (module, tensors), *rest = network.modules
    broken = {**tensors, "lora_up.weight": tensors["lora_up.weight"][:, :-1]}  # rank 3 up, rank 4 down
    bad = lora.Network([*rest, (module, broken)], network.fit)
    loaded.extras.loras["broken"] = bad
    component = Component("lora", "broken", "broken", str(good), "broken")
    with pytest.raises(RuntimeError):
        use_loras(pipe, loaded.extras, (LoraUse(component, 0.7, 0.7, "broken"),))
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())
    del loaded.extras.loras["broken"]
    merge(loaded, ())  # the base is what the worker believes it holds
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())


# -- images ----------------------------------------------------------------------------------

CELL = dict(
    prompt="a cow standing in a field",
    negative_prompt="lowres",
    clip_skip=1,
    seed=3,
    sampler="Euler a",
    steps=3,
    guidance=7.0,
    width=64,
    height=64,
    dtype="float32",
)


@pytest.fixture(scope="module")
def reference_renderer(tiny_folder: Path) -> tuple[Any, ModelSpec, Any]:
    """A second resident tiny pipeline, whose weights the tests set from the formulas."""
    from diffusers import StableDiffusionPipeline

    from gridrender.workers.render import Renderer

    spec = ModelSpec("reference", "builtin", "tiny", "reference-weights", None, 12)
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    renderer = Renderer(compile_mode="eager")
    renderer.cache.put(spec, "float32", pipe)
    return renderer, spec, renderer.cache.get(spec, "float32").pipe


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


@pytest.mark.parametrize("kind", ("lora", "locon", "loha", "lokr", "dora", "peft"))
def test_each_layout_renders_the_image_of_the_formula_weights(kind, renderer, tiny, loaded, reference_renderer, tmp_path):
    ref_renderer, spec, ref_pipe = reference_renderer
    merge(loaded, ())
    path, case = write_case(kind, loaded.pipe, tmp_path)
    component = resolve_lora(str(path), tiny, Settings())
    image = renderer.render(tiny, [make_cell(tiny, **CELL, loras=(LoraUse(component, TE, UNET_M, "x"),))])[0].image
    plain = renderer.render(tiny, [make_cell(tiny, **CELL)])[0].image
    saved = snapshot(ref_pipe)
    with torch.no_grad():
        for (component_name, layer), (layer_kind, parts) in case.items():
            target = weight(ref_pipe, component_name, layer)
            multiplier = TE if component_name == "text_encoder" else UNET_M
            target.copy_(target + multiplier * reference(layer_kind, parts, target.detach().clone()))
    expected = ref_renderer.render(spec, [make_cell(spec, **CELL)])[0].image
    with torch.no_grad():
        for (component_name, name), value in saved.items():
            roots(ref_pipe)[component_name].get_parameter(name).copy_(value)
    assert np.abs(pixels(image) - pixels(expected)).max() <= 1, kind
    assert np.abs(pixels(image) - pixels(plain)).max() > 3, kind  # the LoRA changes the image


def test_a_kohya_file_and_its_peft_conversion_render_the_same_image(renderer, tiny, loaded, tmp_path):
    merge(loaded, ())
    kohya, _ = write_case("lora", loaded.pipe, tmp_path / "kohya", seed=5)
    peft, _ = write_case("peft", loaded.pipe, tmp_path / "peft", seed=5)
    images = [
        renderer.render(tiny, [make_cell(tiny, **CELL, loras=(LoraUse(resolve_lora(str(p), tiny, Settings()), 0.9, 0.9, "x"),))])[
            0
        ].image
        for p in (kohya, peft)
    ]
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() <= 1


def test_unloading_renders_the_base_image_again_exactly(renderer, tiny, loaded, tmp_path):
    path, _ = write_case("locon", loaded.pipe, tmp_path)
    component = resolve_lora(str(path), tiny, Settings())
    first = renderer.render(tiny, [make_cell(tiny, **CELL)])[0].image
    renderer.render(tiny, [make_cell(tiny, **CELL, loras=(LoraUse(component, 1.0, 1.0, "x"),))])
    again = renderer.render(tiny, [make_cell(tiny, **CELL)])[0].image
    assert np.array_equal(pixels(first), pixels(again))


# -- A1111's tags, hashes and key matching ---------------------------------------------------


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("<lora:detail:0.8>", ("detail", 0.8, 0.8)),  # unet = te when not given
        ("<lora:detail>", ("detail", 1.0, 1.0)),
        ("<lora:detail:0.5:1.5>", ("detail", 0.5, 1.5)),
        ("<lora:detail:te=0.25:unet=0.75>", ("detail", 0.25, 0.75)),
        ("<lora:detail:unet=0.2>", ("detail", 1.0, 0.2)),
        ("<lora:detail:0.4:unet=1>", ("detail", 0.4, 1.0)),
        ("<lyco:detail:0.6>", ("detail", 0.6, 0.6)),
    ],
)
def test_lora_tags_read_as_a1111_reads_them(tag, expected):
    (found,) = lora_tags(f"a cow, {tag} in a field")
    assert (found.name, found.te, found.unet) == expected and found.written == tag


@pytest.mark.parametrize(
    "tag",
    [
        "<lora:detail:lots>",
        "<lora:detail:inf>",
        "<lora:detail:nan>",
        "<lora:detail:1:1:8>",
        "<lora:detail:dyn=8>",
        "<lora::1>",
        "<lora:detail:1e30>",
        "<lora:detail:-11>",
        "<lora:detail:0.5:-1e6>",
        "<lora:detail:0.5:nan>",
        "<lora:detail:te=inf>",
        "<lora:detail:unet=-inf>",
        "<lora:detail:unet=1e308>",
    ],
)
def test_lora_tags_a1111_would_fail_on_are_refused(tag):
    with pytest.raises(ValueError, match="lora"):
        lora_tags(tag)


def test_two_tags_are_two_loras_in_prompt_order():
    assert [t.name for t in lora_tags("<lora:b:1> x <lora:a:0.5:0>")] == ["b", "a"]
    assert isinstance(lora_tags("<lora:b:1>")[0], LoraTag)


@pytest.mark.parametrize("prompt, listed", [("<lora:twice:0.5> a cow <lora:twice:1>", False), ("a cow <lora:twice:0.5>", True)])
def test_a_lora_named_twice_is_refused_at_validate(prompt, listed, loaded, job_file, tmp_path):
    """networks.py load_networks reuses the one Network of a name and sets its multipliers again for each
    mention: A1111 applies `<lora:x:0.5> <lora:x:1>` as x twice at 1, not as written."""
    from gridrender.scheduler.errors import JobError
    from gridrender.scheduler.plan import prepare

    layers, _, _ = sd1_case("lora", loaded.pipe, 1)
    path = build.write(tmp_path / "loras" / "twice.safetensors", layers)
    job = job_file(prompts=[prompt], loras=[{"path": str(path), "weight": 0.8}] if listed else [])
    with pytest.raises(JobError, match=r"'twice' is (named twice|also in `loras:`)"):
        prepare(job, cuda=False, settings=Settings(lora_dir=str(path.parent)))
    prepare(job_file(prompts=["<lora:twice:0.5> a cow"]), cuda=False, settings=Settings(lora_dir=str(path.parent)))


def test_lora_hash_is_a1111s_hash_of_the_tensor_data_or_kohyas_metadata(loaded, tiny, tmp_path):
    path, _ = write_case("lora", loaded.pipe, tmp_path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")  # hashes.py addnet_hash_safetensors: sha256 of what follows the header
    component = resolve_lora(str(path), tiny, Settings())
    assert component.short_hash() == hashlib.sha256(data[8 + size :]).hexdigest()[:12]
    assert component.sha256 == hashlib.sha256(data).hexdigest()  # the cell id's identity is the whole file
    layers, _, _ = sd1_case("lora", loaded.pipe, 1)
    tagged = build.write(tmp_path / "tagged.safetensors", layers, metadata={"sshs_model_hash": "ab" * 32})
    assert resolve_lora(str(tagged), tiny, Settings()).short_hash() == "ab" * 6  # network.py: metadata first


# -- SDXL --------------------------------------------------------------------------------------

# Kohya names SDXL's UNet layers by the SGM UNet it trains (sgm openaimodel numbering:
# input_blocks 1-2 down block 0, 3 its downsampler, 4-5 block 1, ...), and its encoders
# lora_te1_ (CLIP-L) and lora_te2_ (bigG, transformers naming). Tiny SDXL below:
# blocks (32, 64, 64), DownBlock2D then two CrossAttnDownBlock2D, two resnets each.
SDXL_UNET = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "lora"),
    "input_blocks_8_1_transformer_blocks_1_attn2_to_k": ("down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k", "lora"),
    "middle_block_1_proj_in": ("mid_block.attentions.0.proj_in", "lora"),
    "output_blocks_1_1_transformer_blocks_0_ff_net_0_proj": (
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
        "lora",
    ),
    "input_blocks_7_0_in_layers_2": ("down_blocks.2.resnets.0.conv1", "locon"),
    "input_blocks_4_0_skip_connection": ("down_blocks.1.resnets.0.conv_shortcut", "locon"),
    "output_blocks_2_2_conv": ("up_blocks.0.upsamplers.0.conv", "locon"),
    "input_blocks_1_0_emb_layers_1": ("down_blocks.0.resnets.0.time_emb_proj", "lora"),
    "label_emb_0_0": ("add_embedding.linear_1", "lora"),
}
SDXL_TE1 = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.2.mlp.fc2")
SDXL_TE2_WHOLE = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.k_proj",
    "encoder.layers.0.self_attn.v_proj",
    "encoder.layers.0.self_attn.out_proj",
    "encoder.layers.0.mlp.fc1",
)
SDXL_TE2_PARTIAL = ("encoder.layers.1.self_attn.q_proj", "encoder.layers.1.self_attn.v_proj")
SDXL_UNMATCHED = (
    "lora_unet_up_blocks_0_upsamplers_0_conv",  # A1111 looks for output_blocks_2_1_conv
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
)  # SD 1.x text-encoder naming


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: Any) -> tuple[Path, Any]:
    """A tiny SDXL as diffusers builds one (UNet with text_time, CLIP-L, bigG with projection), saved as a folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=8,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=64,
    )
    clip_l = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=514,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    big_g = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            vocab_size=514,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    for name, module in (("unet", unet), ("text_encoder", clip_l), ("text_encoder_2", big_g)):
        module.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            }
        )
    )
    return folder, SimpleNamespace(unet=unet.eval(), text_encoder=clip_l.eval(), text_encoder_2=big_g.eval())


def sdxl_file(pipe: Any, folder: Path) -> tuple[Path, Case]:
    rng = torch.Generator().manual_seed(9)
    layers: dict[str, build.Parts] = {}
    case: Case = {}
    for key, (path, kind) in SDXL_UNET.items():
        layers["lora_unet_" + key] = parts = build.lora(tuple(weight(pipe, "unet", path).shape), RANK, rng, ALPHA)
        case[("unet", path)] = (kind, parts)
    for component, prefix, paths in (
        ("text_encoder", "lora_te1_text_model_", SDXL_TE1),
        ("text_encoder_2", "lora_te2_text_model_", SDXL_TE2_WHOLE + SDXL_TE2_PARTIAL),
    ):
        for path in paths:
            layers[prefix + path.replace(".", "_")] = parts = build.lora(
                tuple(weight(pipe, component, path).shape), RANK, rng, ALPHA
            )
            if path not in SDXL_TE2_PARTIAL:
                case[(component, path)] = ("lora", parts)
    for key in SDXL_UNMATCHED:
        layers[key] = build.lora((64, 64) if "te" not in key else (32, 32), RANK, rng, ALPHA)
    return build.write(folder / "sdxl-style.safetensors", layers), case


def test_an_sdxl_kohya_file_merges_as_a1111_merges_it(sdxl, tmp_path):
    from gridrender.workers.components import Extras, use_loras

    folder, pipe = sdxl
    spec = resolve(str(folder))
    path, case = sdxl_file(pipe, tmp_path)
    notes: list[str] = []
    component = resolve_lora(str(path), spec, Settings(), notes)
    said = "\n".join(notes)
    assert "didn't match keys" in said and all(key in said for key in SDXL_UNMATCHED), said
    assert "1_model_transformer_resblocks_1_attn" in said and "q, k, v and out" in said, said
    before = snapshot(pipe)
    extras = Extras()
    use_loras(pipe, extras, (LoraUse(component, 0.6, 1.2, "sdxl-style"),))
    for (component_name, name), value in snapshot(pipe).items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and (component_name, layer) in case:
            kind, parts = case[(component_name, layer)]
            base = before[(component_name, name)]
            multiplier = 1.2 if component_name == "unet" else 0.6
            assert torch.allclose(value, base + multiplier * reference(kind, parts, base), atol=2e-5, rtol=1e-4), layer
        else:  # bigG's layer 1 attention (q and v only) is left alone, as A1111 leaves it
            assert torch.equal(value, before[(component_name, name)]), (component_name, name)
    use_loras(pipe, extras, ())
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())


def test_full_diffs_change_biases_as_a1111_and_a_fused_bigg_attention_only_its_out_bias(sdxl, tmp_path):
    """networks.py network_apply_weights: a layer's bias += multiplier · diff_b; through bigG's fused
    MultiheadAttention `updown_q, _ = module_q.calc_updown(qw)` drops q, k and v's ex_bias, out's is added."""
    from gridrender.workers.components import Extras, use_loras

    folder, pipe = sdxl
    rng = torch.Generator().manual_seed(4)
    attention = [f"encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    layers = {
        "lora_te2_text_model_" + p.replace(".", "_"): build.full(tuple(weight(pipe, "text_encoder_2", p).shape), rng)
        for p in attention
    }
    proj_in = "down_blocks.1.attentions.0.proj_in"
    layers["lora_unet_input_blocks_4_1_proj_in"] = build.full(tuple(weight(pipe, "unet", proj_in).shape), rng)
    path = build.write(tmp_path / "full.safetensors", layers)
    component = resolve_lora(str(path), resolve(str(folder)), Settings())
    before = snapshot(pipe)
    extras = Extras()
    use_loras(pipe, extras, (LoraUse(component, 0.6, 1.4, "full"),))
    after = snapshot(pipe)
    diffs = {("text_encoder_2", p): layers["lora_te2_text_model_" + p.replace(".", "_")] for p in attention}
    diffs[("unet", proj_in)] = layers["lora_unet_input_blocks_4_1_proj_in"]
    for (component_name, layer), parts in diffs.items():
        m = 1.4 if component_name == "unet" else 0.6
        w, b = (component_name, layer + ".weight"), (component_name, layer + ".bias")
        assert torch.allclose(after[w], before[w] + m * parts["diff"], atol=1e-6), layer
        if layer.endswith(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(after[b], before[b]), layer  # A1111 drops their ex_bias
        else:
            assert torch.allclose(after[b], before[b] + m * parts["diff_b"], atol=1e-6), layer
    use_loras(pipe, extras, ())
    assert all(torch.equal(value, before[key]) for key, value in snapshot(pipe).items())


def test_an_sdxl_lora_on_an_sd1_model_is_refused_at_validate_naming_the_file(sdxl, job_file, tmp_path):
    _, pipe = sdxl
    path, _ = sdxl_file(pipe, tmp_path)
    result = cli("validate", str(job_file(loras=[{"path": str(path), "weight": 0.8}])))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sdxl-style.safetensors" in result.stderr and "SDXL LoRA" in result.stderr and "loras.0.path" in result.stderr


def test_validate_lists_the_keys_a1111_would_not_match(loaded, job_file, tmp_path):
    layers, _, _ = sd1_case("lora", loaded.pipe, 2)
    layers["lora_unet_no_such_block_proj"] = build.lora((32, 32), RANK, torch.Generator().manual_seed(0), ALPHA)
    path = build.write(tmp_path / "odd.safetensors", layers)
    result = cli("validate", str(job_file(loras=[{"path": str(path), "weight": 1.0}])))
    assert result.returncode == 0, result.stderr
    assert (
        "didn't match keys: lora_unet_no_such_block_proj.alpha, lora_unet_no_such_block_proj.lora_down.weight, "
        "lora_unet_no_such_block_proj.lora_up.weight"
    ) in result.stderr


# builtin:tiny-sdxl: blocks (32, 64), DownBlock2D then CrossAttnDownBlock2D (transformer depth 2),
# so SGM's input_blocks 4-5 are down block 1, output_blocks 0-2 up block 0 (upsampler: 2.2).
XL_BUILTIN_UNET = {
    "input_blocks_4_1_transformer_blocks_1_attn2_to_k": ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "lora"),
    "output_blocks_0_1_transformer_blocks_0_attn1_to_q": ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lora"),
    "middle_block_1_transformer_blocks_0_ff_net_2": ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "lora"),
    "output_blocks_2_2_conv": ("up_blocks.0.upsamplers.0.conv", "locon"),
    "input_blocks_5_0_in_layers_2": ("down_blocks.1.resnets.1.conv1", "locon"),
}
XL_BUILTIN_TEXT = {
    "lora_te1_text_model_": ("text_encoder", ("encoder.layers.5.self_attn.v_proj", "encoder.layers.2.mlp.fc1")),
    "lora_te2_text_model_": (
        "text_encoder_2",
        tuple(
            f"encoder.layers.6.{p}"
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc2")
        ),
    ),
}


def test_an_sdxl_kohya_lora_renders_through_gridrender_as_the_formula_weights(renderer, tmp_path):
    """End to end on builtin:tiny-sdxl: resolve, merge into the UNet and both encoders, render."""
    import dataclasses

    xl = resolve("builtin:tiny-sdxl")
    loaded_xl = renderer.cache.get(xl, "float32")
    merge(loaded_xl, ())
    pipe = loaded_xl.pipe
    rng = torch.Generator().manual_seed(21)
    layers: dict[str, build.Parts] = {}
    case: Case = {}
    for key, (path, kind) in XL_BUILTIN_UNET.items():
        layers["lora_unet_" + key] = parts = build.lora(tuple(weight(pipe, "unet", path).shape), RANK, rng, ALPHA)
        case[("unet", path)] = (kind, parts)
    for prefix, (component, paths) in XL_BUILTIN_TEXT.items():
        for path in paths:
            layers[prefix + path.replace(".", "_")] = parts = build.lora(
                tuple(weight(pipe, component, path).shape), RANK, rng, ALPHA
            )
            case[(component, path)] = ("lora", parts)
    file = build.write(tmp_path / "xl-style.safetensors", layers, {"ss_base_model_version": "sdxl_base_v1-0"})
    notes: list[str] = []
    lora = resolve_lora(str(file), xl, Settings(), notes)
    assert notes == []  # every key matched, every layer applied
    cell = dict(
        prompt="a (cow:1.3) standing in a field",
        negative_prompt="lowres",
        clip_skip=1,
        seed=5,
        sampler="Euler a",
        steps=4,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    image = renderer.render(xl, [make_cell(xl, **cell, loras=(LoraUse(lora, 0.8, 1.2, "xl-style"),))])[0].image
    plain = renderer.render(xl, [make_cell(xl, **cell)])[0].image
    # the reference: the same model made resident a second time, its weights set from the formulas
    from diffusers import StableDiffusionXLPipeline

    from gridrender.workers.pipelines import builtin_folder
    from gridrender.workers.render import Renderer

    spec = dataclasses.replace(xl, revision="reference-weights")
    ref = StableDiffusionXLPipeline.from_pretrained(builtin_folder("tiny-sdxl"), add_watermarker=False)
    with torch.no_grad():
        for (component, path), (kind, parts) in case.items():
            target = weight(ref, component, path)
            target.copy_(target + (0.8 if component != "unet" else 1.2) * reference(kind, parts, target.detach().clone()))
    ref_renderer = Renderer(compile_mode="eager")
    ref_renderer.cache.put(spec, "float32", ref)
    expected = ref_renderer.render(spec, [make_cell(spec, **cell)])[0].image
    assert np.abs(pixels(image) - pixels(expected)).max() <= 1
    assert np.abs(pixels(image) - pixels(plain)).max() > 3
    # and it is refused on SD 1.x, naming the file: kohya's metadata says SDXL
    with pytest.raises(Exception, match=r"xl-style.safetensors.*SDXL LoRA"):
        resolve_lora(str(file), resolve("builtin:tiny"), Settings())
