"""tritongpt's own import name for its kernels: ``tritongpt.kernels`` is the repository's kernels/ folder.

Hugging Face's ``kernels`` package, which transformers 5.25 and later import when they load, has
the bare name ``kernels``, like our folder; wherever the repository root is on sys.path (every
``python -m`` run from it puts it first) our folder would shadow theirs. So our code imports
``tritongpt.kernels`` only, and importing this package puts a finder first on sys.meta_path that
answers both names: ``tritongpt.kernels`` with our folder, and ``kernels`` with the first package of
that name on sys.path outside the repository root (Hugging Face's) or, where none is installed,
with a stand-in that has no file and no version, which transformers reads as "not installed".

Before anything of ours is imported, a bare ``import kernels`` run from the root (transformers
loading, say) still finds our folder: kernels/__init__.py then calls ``claim_bare_name``, which
goes on loading the folder as ``tritongpt.kernels`` and gives the bare name to Hugging Face's
package. Either way our kernels load once, under one name, so their op registry and torch custom
ops exist once. Installed from a wheel, the kernels sit inside this package and none of this runs.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # kernels/, model/, train/ beside tritongpt/
KERNELS = os.path.join(ROOT, "kernels")
NOT_INSTALLED = ("the name 'kernels' belongs to Hugging Face's kernels package, which is not installed "
                 "(pip install kernels); tritongpt's kernels import as tritongpt.kernels")


def kernels_spec() -> importlib.machinery.ModuleSpec:
    """Our kernels/ folder as the package tritongpt.kernels."""
    return importlib.util.spec_from_file_location("tritongpt.kernels", os.path.join(KERNELS, "__init__.py"),
                                                  submodule_search_locations=[KERNELS])


def bare_kernels_spec() -> importlib.machinery.ModuleSpec:
    """What the bare name ``kernels`` loads: Hugging Face's package, or the stand-in where it is absent."""
    root = os.path.realpath(ROOT)
    outside_root = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]  # '': the cwd
    spec = importlib.machinery.PathFinder.find_spec("kernels", outside_root)
    if spec is not None and spec.origin is not None:       # origin None: a namespace folder, no package
        return spec
    return importlib.machinery.ModuleSpec("kernels", _StandIn())


class _StandIn(importlib.abc.Loader):
    """Loads an empty module whose every attribute lookup fails with NOT_INSTALLED."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, NOT_INSTALLED)
        module.__getattr__ = _not_installed                # PEP 562: called for any missing attribute
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _not_installed(name: str):
    raise AttributeError(f"module 'kernels' has no attribute {name!r}: {NOT_INSTALLED}")


class _Finder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: tritongpt.kernels is our folder, the bare kernels never is."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "tritongpt.kernels":
            return kernels_spec()
        if fullname == "kernels":
            return bare_kernels_spec()
        return None


def claim_bare_name(module: types.ModuleType) -> None:
    """Called by kernels/__init__.py while it runs under the bare name ``kernels``: the module goes on
    loading as tritongpt.kernels, and the bare name gets Hugging Face's package (or the stand-in),
    which is what the interrupted ``import kernels`` returns."""
    if "tritongpt.kernels" in sys.modules:                 # only with the finder taken off sys.meta_path
        raise ImportError("tritongpt's kernels are already loaded as tritongpt.kernels: a second copy under "
                          "the name 'kernels' would register every op twice; import tritongpt.kernels")
    module.__spec__ = kernels_spec()
    module.__name__ = module.__package__ = module.__spec__.name
    module.__loader__ = module.__spec__.loader
    sys.modules["tritongpt.kernels"] = module
    globals()["kernels"] = module                          # what `from tritongpt import kernels` reads
    spec = bare_kernels_spec()
    bare = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = bare
    try:
        spec.loader.exec_module(bare)
    except BaseException:
        del sys.modules["tritongpt.kernels"], globals()["kernels"]
        raise


if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")):   # the repository
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
