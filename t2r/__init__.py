"""t2r: turn pretrained Transformer LLMs into Gated Slot Attention RNNs.

``import t2r`` registers the converted architectures with transformers' Auto classes, so a converted
directory loads with plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["GSACache", "__version__"]


def _started_as_the_cli() -> bool:
    """True in the ``t2r`` console script: its commands import the model classes when they need them, so that
    ``t2r --help`` does not pay for torch and transformers (seconds)."""
    main = sys.modules.get("__main__")
    return Path(getattr(main, "__file__", None) or "").name in ("t2r", "t2r.exe", "t2r-script.py")


if not _started_as_the_cli():
    import t2r.models.auto  # noqa: F401  (registers the Auto classes)


def __getattr__(name: str) -> Any:
    if name == "GSACache":
        from t2r.models.cache_t2r import GSACache

        return GSACache
    raise AttributeError(f"module 't2r' has no attribute {name!r}")
