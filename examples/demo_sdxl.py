"""Write the tiny SDXL checkpoints examples/sdxl.yaml renders: single files in SDXL's original layout.

    python examples/demo_sdxl.py   # then: gridrender run examples/sdxl.yaml

builtin:tiny-sdxl (random weights of SDXL's architecture, two text encoders of
different widths and depths) written as one .safetensors file the way SDXL, Pony and
Illustrious checkpoints are shared, and once more with NoobAI-XL v-pred's `v_pred` and
`ztsnr` markers: gridrender reads the family and the v-prediction from the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gridrender.workers.pipelines import builtin_folder  # noqa: E402
from tests.support.singlefile import write_single_file  # noqa: E402

if __name__ == "__main__":
    demo = ROOT / "examples" / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    folder = builtin_folder("tiny-sdxl")
    write_single_file(folder, demo / "tiny-sdxl.safetensors")
    write_single_file(folder, demo / "tiny-sdxl-vpred.safetensors", extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    print(f"wrote {demo / 'tiny-sdxl.safetensors'} and {demo / 'tiny-sdxl-vpred.safetensors'}")
