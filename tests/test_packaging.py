"""Install layout and startup: one top-level package (``t2r``); an sdist that builds a wheel carrying the CLI,
kernels and recipes; the wheel working outside the checkout; generation needing only the core dependencies;
the CLI starting without torch or transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) from ``python -m build``, whose wheel is built from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = out.glob("t2r-*.tar.gz")
    (wheel,) = out.glob("t2r-*.whl")
    return sdist, wheel


def test_wheel_from_the_sdist_carries_cli_kernels_recipes_and_license(built):
    sdist, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert tops == {"t2r"}, tops
    shipped_recipes = {n for n in names if n.startswith("t2r/train/recipes/") and n.endswith(".yaml")}
    assert {"t2r/train/recipes/demo-cpu.yaml", "t2r/train/recipes/smollm2-135m.yaml"} <= shipped_recipes
    recipes = ROOT / "t2r" / "train" / "recipes"
    assert {Path(n).name for n in shipped_recipes} == {p.name for p in recipes.glob("*.yaml")}
    kernels = {Path(n).name for n in names if n.startswith("t2r/kernels/") and n.endswith(".py")}
    assert kernels == {p.name for p in (ROOT / "t2r" / "kernels").glob("*.py")}
    assert "t2r/cli.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: train" in metadata
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core if any(p in line for p in ("peft", "datasets", "gguf", "matplotlib"))], core
    with tarfile.open(sdist) as tar:
        members = {Path(m).relative_to(Path(m).parts[0]).as_posix() for m in tar.getnames() if "/" in m}
    assert {"LICENSE", "pyproject.toml", "t2r/train/recipes/tiny-test.yaml", "t2r/kernels/chunk_jit.py"} <= members


def test_installed_wheel_converts_finetunes_with_a_shipped_recipe_and_generates(built, tiny_converted, tmp_path):
    """The wheel alone (no checkout on the path, run from elsewhere): convert, finetune by recipe name, generate."""
    _, wheel = built
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text((ROOT / "LICENSE").read_text() * 4)

    def t2r(*args: str) -> str:
        code = "import sys, t2r.cli; sys.argv = ['t2r', *sys.argv[1:]]; t2r.cli.main()"
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=work, env=env, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import t2r; print(t2r.__file__)"], capture_output=True, text=True, cwd=work, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where
    teacher = tiny_converted.parent / "teacher"
    t2r("convert", str(teacher), "conv", "--num-slots", "8")
    sets = ["--set", "stages.0.steps=2", "--set", "stages.1.steps=2", "--set", "eval_every=0"]
    t2r("finetune", "conv", "run", "--data", "data.txt", "--recipe", "tiny-test", *sets, "--device", "cpu")
    text = t2r("generate", "run", "--prompt", "Licensed under", "--max-new-tokens", "4", "--device", "cpu")
    assert text.startswith("Licensed under")


def test_the_console_script_never_asks_to_run_the_checkpoints_code(tiny_converted, tmp_path):
    """The `t2r` script imports the model classes only when a command needs them; a command that reads a
    converted directory's tokenizer or config first (finetune, export) must register them before, or transformers
    finds the directory's modeling code and stops to ask whether to run it (a prompt that waits at a terminal)."""
    script = tmp_path / "bin" / "t2r"  # the console script's name: t2r/__init__.py then skips the registration
    script.parent.mkdir()
    script.write_text("import sys\nfrom t2r.cli import main\nsys.exit(main())\n")
    (tmp_path / "data.txt").write_text((ROOT / "LICENSE").read_text() * 4)

    def t2r(*args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                             stdin=subprocess.DEVNULL, env=env, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout + out.stderr

    sets = ["--set", "stages.0.steps=1", "--set", "stages.1.steps=1", "--set", "eval_every=0"]
    logs = t2r("finetune", str(tiny_converted), "run", "--data", "data.txt", "--recipe", "tiny-test", *sets,
               "--device", "cpu")  # fmt: skip
    logs += t2r("export", "run", "export")
    assert "custom code" not in logs and "trust_remote_code" not in logs, logs[-3000:]


def test_hf_kernels_package_is_not_shadowed_from_the_checkout():
    """transformers imports Hugging Face's top-level ``kernels``: nothing of ours may answer to that name, even
    when Python runs from the repository root."""
    code = (
        "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None);"
        "from transformers import LlamaConfig; import t2r.kernels"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip()
    assert origin == "None" or "site-packages" in Path(origin).parts, origin
    assert not (ROOT / "kernels" / "__init__.py").exists() and not (ROOT / "cli.py").exists()


@pytest.mark.parametrize(
    "args", [[], ["convert"], ["finetune"], ["export"], ["generate"], ["eval"], ["bench"], ["bench", "kernels"]]
)
def test_cli_help_imports_neither_torch_nor_transformers(args):
    """``t2r --help`` and each command's help start in a fraction of a second: they must not import torch or
    transformers (seconds each). Checked by Python's import log of the installed console script."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "t2r"), *args, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Usage" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "t2r.cli" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "peft", "datasets"))
    assert not heavy, heavy[:10]


def test_generation_needs_only_the_core_dependencies(tiny_converted):
    """Loading and generating import nothing from the train extra (peft, datasets, gguf, matplotlib)."""
    code = f"""
import sys
import importlib.machinery
class NotInstalled(importlib.machinery.PathFinder):  # the train extra's packages, as if absent
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("peft", "datasets", "gguf", "matplotlib"):
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import t2r.cli
sys.argv = ["t2r", "generate", {str(tiny_converted)!r}, "--prompt", "The", "--max-new-tokens", "3", "--device", "cpu"]
t2r.cli.main()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("The")


def test_convert_imports_no_training_evaluation_or_bench_code():
    """Import floors: converting needs the model, shards and sources, not the trainer, evaluation or benchmarks."""
    code = (
        "import sys, t2r.convert.converter, t2r.convert.layer_select, t2r.convert.window_sink;"
        "print(sorted(m for m in sys.modules if m.startswith(('t2r.train', 't2r.eval', 't2r.bench'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
