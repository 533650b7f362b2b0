"""The torch-free side of gridrender: job files, grids, storage, finalize.

Nothing in this package may import torch, diffusers or transformers: submitting a
job from a laptop needs neither (DESIGN.md, Boundaries).
"""
