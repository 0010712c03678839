"""Print pip constraints that pin each runtime dependency of pyproject.toml (core and the train extra) to its
declared lower bound, so that CI tests the floor we promise. torch included: PyPI's Linux builds of it are CUDA
builds, which run on a CPU too, and the one at the floor brings the Triton release it was built with (torch 2.11:
Triton 3.6, whose interpreter then runs the kernel tests)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["train"]]
    out = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+).*", spec)
        if m is None:
            raise SystemExit(f"floor_constraints: no lower bound in {spec!r}")
        out[m.group(1)] = m.group(2)
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, version in floors(root / "pyproject.toml").items():
        print(f"{name}=={version}")
    sys.exit(0)
