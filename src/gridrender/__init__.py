"""gridrender: Stable Diffusion grids as batch jobs."""

__version__ = "0.1.0"
