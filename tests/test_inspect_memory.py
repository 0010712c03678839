"""benchmarks/inspect_memory.py: slot half-lives measured from the model's own gates, window shares of hybrids."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, tiny_tokenizer
from transformers import AutoModelForCausalLM

from t2r.convert import ConvertOptions, convert

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "inspect_memory.py"


def test_half_lives_match_the_gate_bias_at_zero_input(tiny_converted, tmp_path):
    """With f_proj's weights zeroed every token sees the bias alone: the measured half-lives are the converter's."""
    teacher = Path(tiny_converted).parent / "teacher"
    out = convert(str(teacher), tmp_path / "hl", ConvertOptions(num_slots=16, gate_half_life_max=2048), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.f_proj.weight)
    tool = runpy.run_path(str(SCRIPT))
    half_lives, shares = tool["memory_stats"](model, torch.randint(3, 90, (2, 30)))
    expect = torch.logspace(math.log10(8), math.log10(2048), 16, dtype=torch.float64)
    assert sorted(half_lives) == list(range(len(model.model.layers)))
    for h in half_lives.values():
        assert rel_err(h.view(-1, 16).double(), expect.expand(h.numel() // 16, 16)) <= 1e-4
    assert shares == {}  # not a hybrid
    assert tool["summary"](expect)["share_over_500"] == pytest.approx(4 / 16)  # 8 * 256 ** (i / 15) > 500: i >= 12


def test_script_reports_layers_and_window_shares(tiny_converted, corpus_files, tmp_path, monkeypatch, capsys):
    teacher = Path(tiny_converted).parent / "teacher"
    hybrid = convert(str(teacher), tmp_path / "hyb", ConvertOptions(num_slots=16, window=8), progress=False)
    tiny_tokenizer().save_pretrained(hybrid)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(hybrid), corpus_files[0], "--tokens", "64",
                                      "--json", str(tmp_path / "r.json")])  # fmt: skip
    runpy.run_path(str(SCRIPT), run_name="__main__")
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["layer"] for r in result["layers"]] == [0, 1, 2]
    share = 1 / (1 + math.exp(-2.0))  # the converter's initial window-mix logit
    assert all(r["window_share"] == [round(share, 3)] * 3 for r in result["layers"])
    assert result["all"]["median_half_life"] > 0 and "window share" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(hybrid), corpus_files[0], "--tokens", "10000000"])
    with pytest.raises(SystemExit, match="fewer than 10000000"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
