"""Use a trained policy: packages that load like Hub models, the drop-in adaptive sampler for
stock diffusers pipelines, the stop-only ``callback_on_step_end``, ``addiffusion generate`` and
``addiffusion policy export``.

Public API (imported lazily, so ``addiffusion --help`` does not import diffusers):
``AdaptivePolicy``, ``PolicyConfig``, ``PolicyPackageError`` (``.package``),
``AdaptiveDiffusionPipeline``, ``AdaptivePipelineOutput``, ``ImageTrace``, ``adapt``
(``.pipeline``), ``AdaptiveStopCallback`` (``.callback``), ``export_policy``,
``package_offline``, ``package_finetuned`` (``.export``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdaptivePolicy": "package",
    "PolicyConfig": "package",
    "PolicyPackageError": "package",
    "AdaptiveDiffusionPipeline": "pipeline",
    "AdaptivePipelineOutput": "pipeline",
    "ImageTrace": "pipeline",
    "adapt": "pipeline",
    "AdaptiveStopCallback": "callback",
    "export_policy": "export",
    "package_offline": "export",
    "package_finetuned": "export",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
