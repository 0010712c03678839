"""Build helpers for setuptools (not installed)."""
