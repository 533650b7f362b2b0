"""k-diffusion's own sampling and external modules, the library A1111's samplers come from.

k-diffusion's package __init__ imports its training extras (wandb, clean-fid,
kornia, ...), so it is installed without dependencies (README's install command)
and only `utils`, `sampling` and `external` are loaded here, under a bare package.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import types

import pytest


@functools.cache
def load() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("k-diffusion is not installed: pip install --no-deps 'k-diffusion==0.1.1.post1' (README)")
    folder = spec.submodule_search_locations[0]
    package = sys.modules.get("k_diffusion")
    if package is None:
        package = types.ModuleType("k_diffusion")
        package.__path__ = [folder]
        sys.modules["k_diffusion"] = package
    modules = {}
    for name in ("utils", "sampling", "external"):
        full = f"k_diffusion.{name}"
        if full not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(full, f"{folder}/{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[full] = module
            with _torchvision_stub():
                module_spec.loader.exec_module(module)
            setattr(package, name, module)
        modules[name] = sys.modules[full]
    return types.SimpleNamespace(**modules)


@contextlib.contextmanager
def _torchvision_stub():
    """k_diffusion.utils imports torchvision's functional transforms, which sampling never uses.

    The stub is visible only while the module executes: other libraries probing for
    torchvision must not find a fake.
    """
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
