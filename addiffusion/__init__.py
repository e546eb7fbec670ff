"""addiffusion: adaptive text-to-image diffusion inference, learned offline-first.

Use a trained policy with a stock diffusers pipeline::

    from addiffusion import AdaptiveDiffusionPipeline, AdaptivePolicy

    adaptive = AdaptiveDiffusionPipeline(pipe, AdaptivePolicy.from_pretrained("models/policy"))

Importing ``addiffusion`` registers the ``discrete_iql`` algorithm with d3rlpy, so that plain
``d3rlpy.load_learnable("policy.d3")`` rebuilds our IQL checkpoints. The registration happens
when d3rlpy is imported (at once if it already is), so that ``addiffusion --help`` and
``addiffusion generate`` do not pay for importing d3rlpy.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

_REGISTERS = "addiffusion.offline_rl.discrete_iql"


class _RegisterWithD3rlpy(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports :data:`_REGISTERS` right after ``d3rlpy`` itself has been imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "d3rlpy":
            return None
        sys.meta_path.remove(self)  # one shot; also lets find_spec see the real finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        importlib.import_module(_REGISTERS)


if "d3rlpy" in sys.modules:
    importlib.import_module(_REGISTERS)
elif not any(isinstance(f, _RegisterWithD3rlpy) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithD3rlpy())

_EXPORTS = {
    "AdaptiveDiffusionPipeline": "addiffusion.policy.pipeline",
    "AdaptivePolicy": "addiffusion.policy.package",
    "adapt": "addiffusion.policy.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
