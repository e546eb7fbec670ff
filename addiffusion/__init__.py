"""addiffusion: adaptive text-to-image diffusion inference, learned offline-first.

Use a trained policy with a stock diffusers pipeline::

    from addiffusion import AdaptiveDiffusionPipeline, AdaptivePolicy

    adaptive = AdaptiveDiffusionPipeline(pipe, AdaptivePolicy.from_pretrained("models/policy"))

Importing ``addiffusion`` registers the ``discrete_iql`` algorithm with d3rlpy, so that plain
``d3rlpy.load_learnable("policy.d3")`` rebuilds our IQL checkpoints. The registration happens
when d3rlpy is imported (at once if it already is), so that ``addiffusion --help`` and
``addiffusion generate`` do not pay for importing d3rlpy. The same hook keeps the deprecation
banner that d3rlpy's ``import gym`` prints off stderr (see ``_drop_gym_notice``).
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
        _drop_gym_notice()
        self._loader.exec_module(module)
        importlib.import_module(_REGISTERS)


def _drop_gym_notice() -> None:
    """Keep d3rlpy's ``import gym`` quiet.

    The old ``gym`` package (which d3rlpy imports; we use gymnasium) prints a 4-line "Gym has been
    unmaintained since 2022" banner to stderr on import: its ``__init__`` prints
    ``gym_notices.notices.notices[gym.__version__]``. It is a print, not a warning, and no
    environment variable turns it off, so drop that one entry before gym is imported; every
    warning gym or d3rlpy emit still gets through.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        from gym_notices import notices
    except ImportError:
        return
    try:
        notices.notices.pop(version("gym"), None)
    except PackageNotFoundError:
        pass


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
