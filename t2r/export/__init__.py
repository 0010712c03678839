"""Run or converted directory -> a self-contained, parity-checked checkpoint (and FLA's layout)."""

from t2r.export.exporter import export

__all__ = ["export"]
