"""Print pip constraints that pin each runtime dependency of pyproject.toml (core and the train extra) to its
declared lower bound, so that CI tests the floor we promise. torch is left out: CPU builds of older torch are
not on PyPI (the GPU tests cover its floor); the suite runs on the torch that setup.sh installs."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["train"]]
    out = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+).*", spec)
        if m is None:
            raise SystemExit(f"floor_constraints: no lower bound in {spec!r}")
        if m.group(1).lower() not in SKIP:
            out[m.group(1)] = m.group(2)
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, version in floors(root / "pyproject.toml").items():
        print(f"{name}=={version}")
    sys.exit(0)
