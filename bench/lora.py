"""What a LoRA costs a worker: one merge per chunk, against forward hooks and a render, in one run.

Run by hand:  python bench/lora.py [--channels 64,128,256,256] [--rank 16] [--size 256] [--steps 10]
A UNet of SD 1.x's layout (narrower by default so a CPU finishes) with a CLIP-L-sized
text encoder, random weights, and a kohya LoRA of civitai's usual shape (rank 16 on every
attention and feed-forward projection of the UNet, and on the text encoder's attention and
MLP; `--locon` adds every conv). Timed in the same process:
(a) switching the weight axis (0.5 -> 1.0 -> 0.5 ...): what a worker pays per chunk;
(b) unloading to the base weights;
(c) one pipeline call (batch 4) with the LoRA merged;
(d) the same call with the LoRA added by forward hooks on every layer, every step
    (how gridrender applied LoRAs before, and A1111's "lora_functional" mode).
Prints seconds and what a 32-cell chunk spends on its one merge.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_pipe(channels: tuple[int, ...]) -> Any:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gridrender.workers.pipelines import builtin_folder

    torch.manual_seed(0)
    tiny = builtin_folder("tiny")
    n = len(channels)
    unet = UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=2,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=514,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    base = StableDiffusionPipeline.from_pretrained(
        tiny, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    vae: AutoencoderKL = base.vae
    tokenizer: CLIPTokenizer = base.tokenizer
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_lora(pipe: Any, rank: int, locon: bool, path: Path) -> int:
    import torch
    from safetensors.torch import save_file

    from gridrender.workers.clip import text_transformer

    rng = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}
    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    for prefix, root, names in (
        ("lora_unet_", pipe.unet, targets),
        ("lora_te_text_model_", text_transformer(pipe.text_encoder), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    ):
        for name, module in root.named_modules():
            conv = isinstance(module, torch.nn.Conv2d)
            if not (name.endswith(names) or (locon and conv and prefix == "lora_unet_")):
                continue
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            out, cin, *kernel = module.weight.shape
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, cin, *kernel, generator=rng) * 0.05
            state[f"{key}.lora_up.weight"] = torch.randn(out, rank, *([1, 1] if kernel else []), generator=rng) * 0.05
            state[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(state, str(path))
    return len(state) // 3


class Hooks:
    """The forward-hook way: out += m·scale·up(down(x)) on every call (LoRA modules only)."""

    def __init__(self, pipe: Any, network: Any, multiplier: float) -> None:
        from gridrender.workers.components import lora_roots

        self.handles = []
        roots = lora_roots(pipe)
        for module, tensors in network.modules:
            layer = roots[module.layer.component].get_submodule(module.layer.path)
            down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
            scale = multiplier * float(tensors["alpha"]) / down.shape[0]
            self.handles.append(layer.register_forward_hook(_lora_hook(down, up, scale)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


_CONV_DIMS = 4  # a conv LoRA's lora_down: (rank, in, kh, kw)


def _lora_hook(down: Any, up: Any, scale: float) -> Callable[[Any, Any, Any], Any]:
    """A forward hook adding scale·up(down(x)) to a layer's output."""
    import torch.nn.functional as F

    def hook(mod: Any, args: Any, output: Any) -> Any:
        x = args[0]
        if down.dim() == _CONV_DIMS:
            low = F.conv2d(x, down, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
            return output + scale * F.conv2d(low, up)
        return output + scale * F.linear(F.linear(x, down.flatten(1)), up.flatten(1))

    return hook


def _time_switches(pipe: Any, extras: Any, uses: list[tuple[Any, ...]], switches: int) -> tuple[list[float], float]:
    """Seconds of each switch of the weight axis after the first load, and of the unload to the base."""
    from gridrender.workers.components import use_loras

    use_loras(pipe, extras, uses[0])  # reads the file once, as a worker's first chunk does
    times = []
    for i in range(switches):
        start = time.perf_counter()
        use_loras(pipe, extras, uses[(i + 1) % 2])
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    use_loras(pipe, extras, ())
    return times, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--switches", type=int, default=6)
    parser.add_argument("--locon", action="store_true")
    args = parser.parse_args()

    import torch

    from gridrender.scheduler.components import Component, LoraUse
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.models import ModelSpec
    from gridrender.scheduler.weightfiles import file_sha256
    from gridrender.workers.components import use_loras
    from gridrender.workers.render import Renderer

    torch.set_grad_enabled(False)
    pipe = build_pipe(tuple(int(c) for c in args.channels.split(",")))
    spec = ModelSpec("bench:lora", "builtin", "bench-lora", "random", None, 12)
    renderer = Renderer(compile_mode="eager")
    loaded = renderer.cache.put(spec, "float32", pipe)
    params = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.text_encoder.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        layers = write_lora(pipe, args.rank, args.locon, path)
        component = Component("lora", "bench", str(path), str(path), file_sha256(path))
        uses = [(LoraUse(component, w, w, "bench"),) for w in (0.5, 1.0)]
        switches, unload = _time_switches(pipe, loaded.extras, uses, args.switches)

        def cells(loras: tuple[LoraUse, ...]) -> list[Any]:
            return [
                make_cell(
                    spec,
                    prompt="a cow standing in a field",
                    negative_prompt="lowres",
                    clip_skip=1,
                    seed=seed,
                    sampler="Euler a",
                    steps=args.steps,
                    guidance=7.0,
                    width=args.size,
                    height=args.size,
                    dtype="float32",
                    loras=loras,
                )
                for seed in range(args.batch)
            ]

        def call(loras: tuple[LoraUse, ...]) -> float:
            batch = cells(loras)
            embeddings = renderer.encode(spec, batch)
            start = time.perf_counter()
            renderer.render(spec, batch, embeddings)
            return time.perf_counter() - start

        call(uses[1])  # warm-up
        merged = call(uses[1])
        use_loras(pipe, loaded.extras, ())
        hooks = Hooks(pipe, loaded.extras.loras[component.identity_key()], 1.0)
        hooked = call(())
        hooks.remove()
    per_switch = statistics.median(switches)
    chunk = merged / args.batch * 32
    print(
        f"model: UNet channels {args.channels}, CLIP-L text encoder, {params / 1e6:.0f}M parameters, float32, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"LoRA: kohya rank {args.rank}{' + LoCon convs' if args.locon else ''}, {layers} layers")
    print(f"(a) switch the weight axis (one merge):  {per_switch * 1000:8.1f} ms  (median of {args.switches})")
    print(f"(b) unload to the base weights:          {unload * 1000:8.1f} ms")
    print(f"(c) one call, batch {args.batch}, {args.size}px, {args.steps} steps, merged: {merged:7.2f} s")
    print(f"(d) the same call with forward hooks:    {hooked:7.2f} s  ({hooked / merged:.2f}x)")
    print(f"a 32-cell chunk renders in ~{chunk:.1f} s; its one merge is {100 * per_switch / chunk:.2f}% of that")


if __name__ == "__main__":
    main()
