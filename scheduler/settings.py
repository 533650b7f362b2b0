"""Configuration from the environment (GRIDRENDER_* and the standard AWS variables)."""
from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRIDRENDER_", extra="ignore")

    broker_url: str = "redis://localhost:6379/0"
    output: str = "./renders"
    model_dir: str | None = None
    max_cells: int = 5_000_000  # a grid above this is almost always a typo in an axis
    # What `dtype: auto` means for `submit`, where the scheduler cannot see the workers' devices.
    auto_dtype: str = "float16"
    # Cells per task message. A chunk must finish well within the visibility timeout:
    # a crashed worker's chunk is redelivered only once that much time has passed.
    chunk_cells: int = 32
    visibility_timeout: int = 3600  # seconds
    task_retries: int = 3
    sheet_max_cells: int = 20_000  # finalize draws sheets for jobs up to this size  # attempts after the first, before a chunk's cells are recorded as failed
