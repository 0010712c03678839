"""Teacher checkpoint -> GSA checkpoint: options, sources, streamed shards, gate initialisation, hybrid extras."""

from __future__ import annotations

from typing import Any

__all__ = ["ConvertOptions", "convert"]


def __getattr__(name: str) -> Any:  # lazy: the command line imports t2r.convert.options without torch
    if name == "convert":
        from t2r.convert.converter import convert

        return convert
    if name == "ConvertOptions":
        from t2r.convert.options import ConvertOptions

        return ConvertOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
