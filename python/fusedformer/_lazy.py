"""Lazy public names for the framework subpackages, so `import fusedformer` imports no framework."""

from __future__ import annotations

import importlib
import sys
import types


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports ``package.<exports[name]>`` on first use of ``name``.

    Some public names are also their defining submodule's name (``ff.torch.optimize`` lives in
    ``fusedformer/torch/optimize.py``). Importing such a submodule, from anywhere, makes the
    import system bind it on the package under that name, and the package's ``__getattr__`` is
    then never asked again: ``ff.torch.use_fused_sdpa`` used first left ``ff.torch.optimize``
    a module ("'module' object is not callable"). The package's class is therefore swapped for
    one whose ``__setattr__`` binds the public object instead of the submodule.
    """
    owner = sys.modules[package]
    if type(owner) is types.ModuleType:
        owner.__class__ = type(f"LazyPackage[{package}]", (_PublicNamesFirst,), {"_exports": exports})

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


class _PublicNamesFirst(types.ModuleType):
    _exports: dict[str, str] = {}

    def __setattr__(self, name: str, value) -> None:
        if (name in self._exports and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            value = getattr(value, name)  # the submodule, bound by its import: keep its public object
        super().__setattr__(name, value)
