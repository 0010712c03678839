"""benchmarks/long_range_layers.py: which teacher layers attend beyond a window, and which retrieve a passkey."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "long_range_layers.py"


def test_script_ranks_every_layer(tiny_converted, corpus_files, tmp_path, monkeypatch, capsys):
    teacher = Path(tiny_converted).parent / "teacher"
    args = [str(SCRIPT), str(teacher), corpus_files[0], "--window", "8", "--tokens", "96", "--context", "128",
            "--trials", "2", "--json", str(tmp_path / "r.json")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["layer"] for r in result["layers"]] == [0, 1, 2] and sorted(result["ranked"]) == [0, 1, 2]
    assert all(0 <= r[k] <= 1 + 1e-6 for r in result["layers"] for k in r if k != "layer")
    assert any(r["far_share_max"] > 0 for r in result["layers"])  # random weights spread attention: some is far
    assert "--full-attention-layers" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [*args[:3], "--window", "100000"])
    with pytest.raises(SystemExit, match="more than 200000 are needed"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
