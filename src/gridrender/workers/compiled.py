"""torch.compile for the UNet and the VAE decoder, with a warm cache on disk.

Compiled by default on CUDA (GRIDRENDER_COMPILE=auto; `on` forces it elsewhere, `off`
or `worker --no-compile` turns it off). Shapes stay static: the renderer pads a
chunk's short last batch to the job's batch size, so a worker compiles once per
(size, batch, prompt length in chunks), never for a new prompt, seed or CLIP skip.
Inductor's caches live under the gridrender cache (`<cache>/compiled`), so a
restarted worker on the same GPU type loads its kernels instead of compiling them.
A module that fails to compile falls back to eager with the reason logged; it never
fails a chunk.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from gridrender.scheduler.settings import Settings

log = logging.getLogger(__name__)

EAGER = "eager"


def enabled(device: torch.device, settings: Settings) -> bool:
    if settings.compile == "off":
        return False
    return settings.compile == "on" or device.type == "cuda"


def use_cache_dir(settings: Settings) -> str:
    """Point inductor (and Triton, which follows it) at gridrender's cache, unless the user chose one.

    torch writes its default (a per-user folder in /tmp) into TORCHINDUCTOR_CACHE_DIR the
    first time it asks; that value is not a choice, and is replaced.
    """
    from torch._inductor import utils as inductor_utils
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        folder = settings.cache_root() / "compiled"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        inductor_utils.clear_inductor_caches()  # paths torch derived from the old folder
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class Compiled:
    """A module's forward compiled on first use; eager for good if compiling fails."""

    def __init__(self, eager: Callable[..., Any], name: str, mode: str):
        self.eager, self.name, self.mode = eager, name, mode
        # dynamic=False: a second shape gets kernels of its own, not slower shape-generic ones.
        self.compiled: Callable[..., Any] | None = torch.compile(eager, mode=None if mode == "default" else mode, dynamic=False)
        self.failure: str | None = None
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        shape = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        first = shape not in self.shapes
        start = time.perf_counter()
        try:
            result = self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (inductor and Triton raise many types; any of them means: run eager)
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.compiled = None
            log.warning("compiling the %s failed; it runs eager from now on (%s)", self.name, self.failure)
            return self.eager(*args, **kwargs)
        if first:
            self.shapes.add(shape)
            log.info("compiled the %s for %s in %.1fs (mode %s)", self.name, shape, time.perf_counter() - start, self.mode)
        return result

    @property
    def state(self) -> str:
        """What the record says: the compile mode in use, or eager (and why)."""
        return self.mode if self.compiled is not None else EAGER


def cache_stats() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process (a warm restart hits)."""
    from torch._dynamo.utils import counters

    inductor: Any = counters["inductor"]
    stats: Any = counters["stats"]
    return {
        "fxgraph_cache_hit": int(inductor["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(inductor["fxgraph_cache_miss"]),
        "graphs": int(stats["unique_graphs"]),
    }
