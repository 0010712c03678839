"""The inference model: config (teacher config + ``gsa_*`` fields), GSA attention, the recurrent cache; these files
travel with saved checkpoints for ``trust_remote_code``. Importing this package is cheap (the command line reads
``settings`` from it); ``t2r.models.auto`` registers the Auto classes."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GSACache": "cache_t2r",
    "GSAStateLayer": "cache_t2r",
    "T2R_CONFIGS": "configuration_t2r",
    "T2R_MODELS": "modeling_t2r",
    "GSAAttention": "modeling_t2r",
    "GSASettings": "settings",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        importlib.import_module(f"{__name__}.auto")  # any model class in use must be registered
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
