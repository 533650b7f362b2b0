"""Run in a fresh process by tests/test_compile.py: render a chunk compiled, report what torch did.

python -m tests.support.compile_probe OUT.npz LORA.safetensors   (GRIDRENDER_CACHE_DIR names the cache)

A chunk of 5 cells at batch size 4 (a full batch, then a short one the renderer pads),
the same 5 cells in full batches, and eager renders of each cell alone; then one cell
without, with, at another weight of, and again without the LoRA, compiled and eager
(one probe serves both: inductor's CPU compile is the slowest thing the suite does).
Prints JSON with torch's compile counters after the first batch, after each LoRA
render and at the end, and timings.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(out: str, lora_path: str) -> None:
    from gridrender.scheduler.components import LoraUse, resolve_lora
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.models import resolve
    from gridrender.scheduler.settings import Settings
    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import ChunkJob, Writer, render_and_store
    from gridrender.workers.compiled import cache_stats
    from gridrender.workers.render import Renderer

    model = resolve("builtin:tiny")
    cells = [
        make_cell(
            model,
            prompt="a cow standing in a field",
            negative_prompt="lowres",
            clip_skip=1 + i % 2,
            seed=100 + i,
            sampler="Euler a",
            steps=3,
            guidance=7.0,
            width=64,
            height=64,
            dtype="float32",
        )
        for i in range(5)
    ]
    compiled = Renderer(compile_mode="default")
    start = time.perf_counter()
    first = compiled.render(model, cells[:4], pad_to=4)
    first_seconds = time.perf_counter() - start
    after_first = cache_stats()
    with tempfile.TemporaryDirectory() as tmp:
        writer = Writer()
        result = render_and_store(compiled, writer, LocalStore(tmp), ChunkJob("probe", model, cells, 4))
        writer.close()
        records = [json.loads(Path(f"{tmp}/cells/{c.id}.json").read_text()) for c in cells]
    padded_last = compiled.render(model, [cells[4]], pad_to=4)[0]  # the short batch, padded
    in_full_batch = compiled.render(model, [cells[4], *cells[:3]], pad_to=4)[0]  # same cell, a full batch of others
    eager = Renderer(compile_mode="eager")
    alone = [eager.render(model, [c])[0] for c in cells]
    # LoRAs merge into the weights in place: the compiled graphs stay valid, nothing recompiles
    lora = resolve_lora(lora_path, model, Settings())
    lora_sets = [(), (LoraUse(lora, 1.0, 1.0, "x"),), (LoraUse(lora, 0.4, 0.4, "x"),), ()]
    lora_cells = [cells[0].replace(loras=s) for s in lora_sets]
    lora_compiled, lora_graphs = [], []
    for cell in lora_cells:
        lora_compiled.append(np.asarray(compiled.render(model, [cell], pad_to=4)[0].image))
        lora_graphs.append(cache_stats()["graphs"])
    lora_eager = [np.asarray(eager.render(model, [cell])[0].image) for cell in lora_cells]
    np.savez(
        out,
        padded_last=np.asarray(padded_last.image),
        in_full_batch=np.asarray(in_full_batch.image),
        first=np.stack([np.asarray(r.image) for r in first]),
        alone=np.stack([np.asarray(r.image) for r in alone]),
        lora_compiled=np.stack(lora_compiled),
        lora_eager=np.stack(lora_eager),
    )
    print(
        json.dumps(
            {
                "after_first": after_first,
                "end": cache_stats(),
                "lora_graphs": lora_graphs,
                "lora_state": compiled.cache.get(model, "float32").compile_state(),
                "first_seconds": first_seconds,
                "rendered": result.rendered,
                "failed": result.failed,
                "record_compile": [r["compile"] for r in records],
                "record_batch": [r["batch_size"] for r in records],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
