"""t2r.convert.layer_select: the teacher's retrieval layers, kept as softmax attention by
convert --full-attention-layers auto:N."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer
from torch import nn

from t2r.convert import ConvertOptions, convert
from t2r.convert.layer_select import (
    far_share,
    key_share,
    key_token_positions,
    layer_table,
    rank_layers,
    retrieval_profile,
)


def test_far_share_counts_only_content_beyond_the_window():
    T, W, sink = 20, 4, 2
    w = torch.zeros(1, 3, T, T)
    w[0, 0] = torch.eye(T)  # each token attends to itself: nothing far
    w[0, 1, :, sink] = 1.0  # everything on token 2: far for every query from 2W on
    w[0, 2, :, 0] = 1.0  # everything on token 0, an attention sink: not counted
    assert far_share(w, W, sink).tolist() == [0.0, 1.0, 0.0]
    w[0, 1] = 0.0
    w[0, 1, torch.arange(T), (torch.arange(T) - W).clamp(min=0)] = 0.5  # half on the token exactly W back
    w[0, 1, torch.arange(T), torch.arange(T)] += 0.5
    assert far_share(w, W, sink)[1].item() == pytest.approx(0.5)


def test_key_share_and_key_positions():
    tok = tiny_tokenizer()
    prompt = "The grass is green. The pass key is 48213. Remember it. 48213 is the pass key.\nThe pass key is"
    positions = key_token_positions(tok, prompt, "48213")
    ids = tok(prompt).input_ids
    assert "".join(tok.decode([ids[p]]) for p in positions).replace(" ", "").count("48213") == 2
    w = torch.zeros(1, 2, len(ids), len(ids))
    w[0, 0, -1, positions] = 1.0 / len(positions)
    w[0, 1, -1, 0] = 1.0
    assert key_share(w, positions).tolist() == pytest.approx([1.0, 0.0])


class _Attention(nn.Module):
    """Stands in for a self-attention module: causal weights over two heads, the last query's row put on the
    prompt's digit tokens with weight ``on_digits`` in head 0 (the rest spread evenly)."""

    def __init__(self, tokenizer, on_digits: float):
        super().__init__()
        self.tokenizer, self.on_digits = tokenizer, on_digits

    def forward(self, ids):
        T = ids.shape[1]
        w = torch.tril(torch.ones(1, 2, T, T))
        w = w / w.sum(-1, keepdim=True)
        digits = [i for i, t in enumerate(ids[0].tolist()) if any(c.isdigit() for c in self.tokenizer.decode([t]))]
        if self.on_digits:
            w[0, 0, -1] = (1 - self.on_digits) / T
            w[0, 0, -1, digits] += self.on_digits / len(digits)
        return None, w


class _Model(nn.Module):
    def __init__(self, tokenizer, shares):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for share in shares:
            layer = nn.Module()
            layer.self_attn = _Attention(tokenizer, share)
            self.model.layers.append(layer)
        self.device = torch.device("cpu")

    def forward(self, input_ids):
        for layer in self.model.layers:
            layer.self_attn(input_ids)


def test_layers_ranked_by_their_retrieval_heads():
    tok = tiny_tokenizer()
    model = _Model(tok, [0.0, 0.9, 0.0, 0.4])  # layers 1 and 3 look at the key from the question
    rows = layer_table(retrieval_profile(model, tok, context=200, trials=3))
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["key_share_max"] > rows[3]["key_share_max"] > rows[0]["key_share_max"]
    assert rows[1]["key_share_max"] == pytest.approx(0.9, abs=0.05)
    assert rank_layers(rows)[:2] == [1, 3]
    # Equal retrieval: the far-reaching layer first.
    tied = [{"layer": 0, "key_share_max": 0.1, "far_share_max": 0.2},
            {"layer": 1, "key_share_max": 0.1, "far_share_max": 0.7}]  # fmt: skip
    assert rank_layers(tied) == [1, 0]


def test_convert_auto_keeps_the_ranked_layers(tiny_converted, tmp_path):
    teacher = Path(tiny_converted).parent / "teacher"
    out = convert(str(teacher), tmp_path / "out", ConvertOptions(num_slots=8, full_attention_auto=1), progress=False)
    record = json.loads((out / "conversion.json").read_text())
    sel = record["full_attention_selection"]
    assert len(sel["ranked"]) == 3 and sorted(sel["ranked"]) == [0, 1, 2]
    assert sel["chosen"] == [sel["ranked"][0]] == record["options"]["full_attention_layers"]
    assert rank_layers(sel["layers"]) == sel["ranked"]
    config = json.loads((out / "config.json").read_text())
    assert config["gsa_full_attention_layers"] == sel["chosen"]
    assert record["gsa_layers"] == [i for i in range(3) if i not in sel["chosen"]]
    assert "strongest retrieval layers" in (out / "README.md").read_text()


def test_convert_auto_with_window_sink(tiny_converted, tmp_path, monkeypatch):
    """auto:N loads the whole teacher once; the hybrids' default window sink never does (it streams the teacher
    layer by layer), and its values do not depend on the selection."""
    from safetensors.torch import load_file

    import t2r.teacher

    loads = []
    real = t2r.teacher.load_eager_teacher
    monkeypatch.setattr(t2r.teacher, "load_eager_teacher", lambda *a, **k: loads.append(a) or real(*a, **k))
    teacher = Path(tiny_converted).parent / "teacher"
    both = convert(str(teacher), tmp_path / "both", ConvertOptions(num_slots=8, window=8, full_attention_auto=1),
                   progress=False)  # fmt: skip
    assert len(loads) == 1
    sink_only = convert(str(teacher), tmp_path / "sink", ConvertOptions(num_slots=8, window=8), progress=False)
    assert len(loads) == 1
    chosen = json.loads((both / "conversion.json").read_text())["options"]["full_attention_layers"]
    a, b = ({k: v for f in p.glob("*.safetensors") for k, v in load_file(str(f)).items()} for p in (both, sink_only))
    for i in range(3):
        for part in ("key", "value"):
            name = f"model.layers.{i}.self_attn.window_sink.{part}"
            assert (name in a) == (i not in chosen) and name in b
            if name in a:
                assert torch.equal(a[name], b[name]), name
