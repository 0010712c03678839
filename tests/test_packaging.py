"""Install layout: kernels/ and cli.py ship as t2r.kernels and t2r.cli, never as top-level modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_everything_under_t2r(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("t2r-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("t2r-")}
    assert tops == {"t2r"}, tops
    for needed in (
        "t2r/cli.py",
        "t2r/kernels/__init__.py",
        "t2r/kernels/gsa_reference.py",
        "t2r/modeling/modeling_t2r.py",
    ):
        assert needed in names


def test_cli_entry_point_runs():
    exe = Path(sys.executable).parent / "t2r"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Gated Slot Attention" in out.stdout


def test_no_top_level_kernels_or_cli_from_installed_t2r(tmp_path):
    code = "import importlib.util as u, t2r.kernels, t2r.cli; print(u.find_spec('kernels'), u.find_spec('cli'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
