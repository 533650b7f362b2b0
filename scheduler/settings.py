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
