"""Teacher checkpoint -> GSA checkpoint: sources, streamed shards, gate initialisation, hybrid extras."""

from t2r.convert.converter import ConvertOptions, convert

__all__ = ["ConvertOptions", "convert"]
