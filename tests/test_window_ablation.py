"""benchmarks/window_ablation.py: the teacher with all but some layers limited to a window (plus sink tokens)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "window_ablation.py"


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(str(SCRIPT))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_window_mask_keeps_the_window_and_the_sinks(tool, kind):
    Q, KV, W, sink = 3, 12, 4, 2
    causal = torch.arange(KV)[None, :] <= torch.arange(KV - Q, KV)[:, None]
    mask = causal if kind == "bool" else torch.zeros(Q, KV).masked_fill(~causal, torch.finfo(torch.float32).min)
    out = tool["window_mask"](mask[None, None], W, sink)[0, 0]
    seen = out if kind == "bool" else out == 0
    for qi, pos in enumerate(range(KV - Q, KV)):  # queries are the last Q positions
        expected = [j <= pos and (j > pos - W or j < sink) for j in range(KV)]
        assert seen[qi].tolist() == expected
    assert torch.equal(tool["window_mask"](mask[None, None], KV, sink), mask[None, None])


@torch.no_grad()
def test_windowed_layers_change_only_what_lies_beyond_the_window(tool, tiny_converted):
    teacher = AutoModelForCausalLM.from_pretrained(
        Path(tiny_converted).parent / "teacher", attn_implementation="eager"
    ).eval()
    ids = torch.randint(3, 100, (1, 40))
    full = teacher(ids).logits
    W = 8
    tap = tool["Windowed"](teacher, set(), W, 0)
    windowed = teacher(ids).logits
    tap.close()
    assert torch.allclose(windowed[:, :W], full[:, :W], atol=1e-5)  # every key still inside the window
    assert (windowed[:, W:] - full[:, W:]).abs().amax() > 1e-3
    assert torch.equal(teacher(ids).logits, full)  # hooks removed
    every = tool["Windowed"](teacher, {0, 1, 2}, W, 0)  # every layer kept: the teacher
    assert torch.equal(teacher(ids).logits, full)
    every.close()


def test_script_reports_each_keep_set(tiny_converted, corpus_files, tmp_path, monkeypatch, capsys):
    teacher = Path(tiny_converted).parent / "teacher"
    out = str(tmp_path / "r.json")
    args = [str(SCRIPT), str(teacher), corpus_files[0], "--window", "8", "--keep", "1,2", "--context", "128",
            "--trials", "2", "--ppl-window", "64", "--ppl-windows", "2", "--json", out]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    rows = json.loads(Path(out).read_text())["rows"]
    assert [r["keep"] for r in rows] == ["all", [], [1, 2]]
    assert all(r["ppl"] > 1 and 0 <= r["passkey"]["128"] <= 1 for r in rows)
    assert rows[1]["ppl"] != rows[0]["ppl"]  # windowing every layer changes the model
    assert "keep [1, 2]" in capsys.readouterr().out
