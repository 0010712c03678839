"""benchmarks/long_range_layers.py: which teacher layers attend beyond a window, and which retrieve a passkey."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "long_range_layers.py"


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(str(SCRIPT))


def test_far_share_counts_only_content_beyond_the_window(tool):
    T, W, sink = 20, 4, 2
    w = torch.zeros(1, 3, T, T)
    w[0, 0] = torch.eye(T)  # each token attends to itself: nothing far
    w[0, 1, :, sink] = 1.0  # everything on token 2: far for every query from 2W on
    w[0, 2, :, 0] = 1.0  # everything on token 0, an attention sink: not counted
    assert tool["far_share"](w, W, sink).tolist() == [0.0, 1.0, 0.0]
    w[0, 1] = 0.0
    w[0, 1, torch.arange(T), (torch.arange(T) - W).clamp(min=0)] = 0.5  # half on the token exactly W back
    w[0, 1, torch.arange(T), torch.arange(T)] += 0.5
    assert tool["far_share"](w, W, sink)[1].item() == pytest.approx(0.5)


def test_key_share_and_key_positions(tool):
    tok = tiny_tokenizer()
    prompt = "The grass is green. The pass key is 48213. Remember it. 48213 is the pass key.\nThe pass key is"
    positions = tool["key_token_positions"](tok, prompt, "48213")
    ids = tok(prompt).input_ids
    assert "".join(tok.decode([ids[p]]) for p in positions).replace(" ", "").count("48213") == 2
    w = torch.zeros(1, 2, len(ids), len(ids))
    w[0, 0, -1, positions] = 1.0 / len(positions)
    w[0, 1, -1, 0] = 1.0
    assert tool["key_share"](w, positions).tolist() == pytest.approx([1.0, 0.0])


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
