"""The one transformers API difference the model code spans between the floor release and the newest.

transformers 5.24 renamed the cache argument of model and attention forwards (and the output field) from
``past_key_values`` to ``cache``; older releases know only the old name, newer ones warn on it. The model code
accepts both names and always hands the installed release its own. This file travels with exported checkpoints.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LlamaForCausalLM

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


def take_cache(kwargs: dict[str, Any], cache: Any = None) -> Any:
    """The cache passed under either name (both removed from ``kwargs``); None if neither."""
    for name in CACHE_NAMES:
        given = kwargs.pop(name, None)
        if given is not None:
            if cache is not None and given is not cache:
                raise ValueError("pass the cache once, as `cache` or as `past_key_values`")
            cache = given
    return cache


def output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` or ``output.past_key_values``, by release)."""
    return getattr(output, CACHE_ARG)
