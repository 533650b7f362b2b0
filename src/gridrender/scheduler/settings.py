"""Configuration: every environment variable gridrender reads, in one class.

GRIDRENDER_* variables plus XDG_CACHE_HOME; the AWS variables are read by boto3
itself (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...). README lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DTYPES = ("float16", "bfloat16", "float32")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRIDRENDER_", extra="ignore")

    broker_url: str = "redis://localhost:6379/0"
    output: str = "./renders"  # default output root of jobs and of the NAME commands
    model_dir: str | None = None  # where relative model paths are also looked up
    lora_dir: str | None = None  # where <lora:NAME:W> tags are looked up
    wildcard_dir: str | None = None  # __name__ wildcard files of dynamic prompts
    max_cells: int = 5_000_000  # a grid above this is almost always a typo in an axis
    # What `dtype: auto` means for `submit`, where the scheduler cannot see the workers' devices.
    auto_dtype: str = "float16"
    # Cells per task message (grown for huge jobs so a job has at most max_chunks chunks, but
    # no bigger than a worker renders in chunk_seconds: see scheduler/rates.py).
    chunk_cells: int = 32
    max_chunks: int = 2048
    # A chunk's expected duration: well under the k8s grace (600 s) and the visibility timeout.
    chunk_seconds: float = Field(default=300.0, gt=0)
    worker_rate: float | None = Field(default=None, gt=0)  # cells/s one worker renders; else the published one
    assumed_rate: float = Field(default=0.5, gt=0)  # cells/s when no rate is known (an SDXL hires render ~0.1)
    # A first submit of a job this small checks each cell in storage (cells other jobs stored are
    # not sent); a bigger one leaves that to the workers. Resubmits check every incomplete chunk.
    presence_check_cells: int = 2_000
    visibility_timeout: int = 3600  # seconds before Redis redelivers an unacknowledged chunk
    heartbeat_interval: float = 2.0  # seconds between a worker's heartbeats
    heartbeat_ttl: float = 10.0  # a worker silent this long is dead; its chunk is re-enqueued
    task_retries: int = 3  # attempts after the first, before a chunk's cells are recorded as failed
    # Seconds a worker retries a storage call through an outage before handing the chunk back (a retry of
    # the chunk that spends none of task_retries).
    storage_deadline: float = 600.0
    sheet_max_cells: int = 20_000  # finalize draws sheets for jobs up to this size
    device: str | None = None  # torch device for workers and `run` (default: cuda if present, else cpu)
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile UNet and VAE decoder: auto = on CUDA only
    compile_mode: str = "default"  # torch.compile mode; "max-autotune" spends minutes per shape
    ready_file: str = "/tmp/gridrender-ready"  # written once `worker --model` has loaded its pipeline
    cache_dir: str | None = None  # default $XDG_CACHE_HOME/gridrender or ~/.cache/gridrender
    xdg_cache_home: str | None = Field(default=None, validation_alias="XDG_CACHE_HOME")

    def cache_root(self) -> Path:
        """Builtin models, model file hashes, config folders, compiled kernels."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = Path(self.xdg_cache_home).expanduser() if self.xdg_cache_home else Path.home() / ".cache"
        return base / "gridrender"


def concrete_dtype(requested: str, cuda: bool | None, settings: Settings | None = None) -> str:
    """What `dtype: auto` means: fp16 on CUDA, fp32 on CPU; for a submit (devices unknown), auto_dtype."""
    if requested != "auto":
        return requested
    if cuda is None:
        return (settings or Settings()).auto_dtype
    return "float16" if cuda else "float32"
