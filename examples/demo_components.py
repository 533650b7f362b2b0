"""Write the demo files examples/compare.yaml uses: a second tiny model and a tiny LoRA.

    python examples/demo_components.py   # then: gridrender run examples/compare.yaml

Random weights on builtin:tiny's architecture (as the tests build them), so the
comparison runs anywhere without downloading a checkpoint. The LoRA is in kohya's
layout (lora_unet_…/lora_te_… keys with alpha), the one civitai files mostly use.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridrender.workers.pipelines import builtin_folder  # noqa: E402
from tests.support.components import write_lora, write_model  # noqa: E402

if __name__ == "__main__":
    demo = ROOT / "examples" / "demo"
    tiny = builtin_folder("tiny")
    if not (demo / "tiny-alt").exists():
        write_model(demo / "tiny-alt", tiny, seed=3)
    write_lora(demo / "detail.safetensors", tiny, seed=1, kohya=True)
    print(f"wrote {demo / 'tiny-alt'} and {demo / 'detail.safetensors'}")
