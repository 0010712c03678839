"""The grouped projection (t2r/kernels/grouped_linear.py; Triton's CPU interpreter here): several linear maps of one
input in one launch, against F.linear each; when decoding takes it (opt-in), and a model decoding through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from conftest import rel_err, tiny_gsa_model

from t2r.kernels import dispatch, grouped_linear
from t2r.kernels.grouped_linear import MAX_ROWS, geometry, grouped_linear_triton
from t2r.kernels.reference import grouped_linear_reference
from t2r.kernels.tuning import TUNING
from t2r.models.projections import project

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("dtype", "bias", "sizes", "rows", "K"),
    [(torch.float32, False, (48, 16, 16, 24), (2, 1), 48), (torch.float32, "some", (40, 8, 16), (5,), 200),
     (torch.bfloat16, False, (64, 32, 32, 64), (16, 1), 96), (torch.bfloat16, True, (24,), (33,), 130),
     (torch.float16, False, (16, 16, 16), (1, 1), 64)],
)  # fmt: skip
@pytest.mark.parametrize("tiles", [None, (32, 128, 4)])
def test_grouped_projection_matches_each_linear_map(monkeypatch, dtype, bias, sizes, rows, K, tiles):
    """With the geometry chosen per call (16-column tiles here) and with 32 x 128 tiles: each output contiguous (a
    block of one buffer: a column view would cost its consumer a copy), equal to F.linear with its weight: 1 to 4
    weights, output sizes that are not whole column tiles (24, 40), inner sizes that are not whole blocks (130,
    200), 1 to 33 rows (two row blocks of 16 past 32), biases on all or some (Qwen2's q/k/v and gates), and an input
    whose rows are a slice of wider ones."""
    monkeypatch.setattr(grouped_linear, "GROUPED_GEOMETRY", tiles)
    wide = torch.randn(*rows, K + 8, device=DEVICE).to(dtype)
    x = wide[..., 4 : 4 + K]  # rows strided by K + 8
    weights = tuple((torch.randn(n, K, device=DEVICE) / K**0.5).to(dtype) for n in sizes)
    biases = tuple(torch.randn(n, device=DEVICE).to(dtype) if bias is True or (bias and i % 2) else None
                   for i, n in enumerate(sizes))  # fmt: skip
    got = grouped_linear_triton(x, weights, biases)
    want = grouped_linear_reference(x, weights, biases)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for a, b, n in zip(got, want, sizes, strict=True):
        assert a.shape == (*rows, n) and a.dtype == dtype and a.is_contiguous()
        assert rel_err(a, b) <= tol
    assert len({a.untyped_storage().data_ptr() for a in got}) == 1  # blocks of one buffer


def test_grouped_geometry_takes_narrow_tiles_where_they_fill_one_wave(monkeypatch):
    cpu = torch.device("cpu")  # counted as 132 multiprocessors
    assert geometry(576 + 3 * 192, 1, cpu) == (16, 256, 2)  # SmolLM2-135M's q/k/v/gates: 72 programs
    assert geometry(576, 64, cpu) == (16, 256, 4)  # its output projection at 64 rows
    assert geometry(2 * 1536, 16, cpu) == (32, 128, 2)  # its gate/up: 192 narrow tiles would take two waves
    assert geometry(2 * 14336, 64, cpu) == (32, 128, 4)  # Mistral-7B's
    monkeypatch.setattr(grouped_linear, "GROUPED_GEOMETRY", (64, 64, 8))
    assert geometry(576, 1, cpu) == (64, 64, 8)


def test_grouped_projection_says_what_it_cannot_take():
    x = torch.randn(2, 16, device=DEVICE)
    w = torch.randn(8, 16, device=DEVICE)
    for weights, biases, x_in, why in (
        ((w,) * 5, (None,) * 5, x, "1 to 4 weights"),
        ((w, torch.randn(8, 12, device=DEVICE)), (None, None), x, "contiguous weights"),
        ((w.t().contiguous().t(),), (None,), x, "contiguous weights"),
        ((w, w), (torch.zeros(9, device=DEVICE), None), x, "each bias"),
        ((w,), (None,), torch.randn(MAX_ROWS + 1, 16, device=DEVICE), "at most 64 rows"),
    ):
        with pytest.raises(ValueError, match=why):
            grouped_linear_triton(x_in, weights, biases)


def test_decoding_takes_the_grouped_projection_when_on_and_without_autograd(monkeypatch):
    """On by default; off (T2R_GSA_GROUPED_PROJECTIONS=0): each module's own GEMM; on: one launch for plain linear
    maps of a few rows without autograd, the modules' own calls under autograd (training merges there), past
    MAX_ROWS rows and under autocast."""
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    calls = []
    kernel = dispatch.grouped_linear_triton
    monkeypatch.setattr(dispatch, "grouped_linear_triton", lambda *a: calls.append(len(a[1])) or kernel(*a))
    assert TUNING.grouped_projections  # the default
    monkeypatch.setattr(TUNING, "grouped_projections", False)
    mods = tuple(nn.Linear(24, n, bias=False).to(DEVICE) for n in (16, 8, 8, 12))
    x = torch.randn(3, 1, 24, device=DEVICE)
    with torch.no_grad():
        project(x, mods)
        assert not calls  # off
        monkeypatch.setattr(TUNING, "grouped_projections", True)
        got = project(x, mods)
        assert calls == [4]
        assert all(rel_err(a, m(x)) <= 1e-5 for a, m in zip(got, mods, strict=True))
        project(torch.randn(MAX_ROWS + 1, 24, device=DEVICE), mods)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            project(x, mods)
        odd = (nn.Sequential(mods[0]), *mods[1:])  # not a plain linear map: each module runs itself
        project(x, odd)
    project(x, mods)  # autograd on
    assert calls == [4]


@torch.no_grad()
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_a_model_decodes_the_same_through_the_grouped_projections(arch, monkeypatch):
    """A tiny converted model's prefill and token-by-token decoding with the grouped projections on: the same
    logits as with them off; each GSA layer's q/k/v/gates, its output projection, each MLP's gate/up and its down
    projection took one launch each per forward (Qwen2's q/k/v with biases, its gates without)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    model = tiny_gsa_model(arch).to(DEVICE)
    model.decode_graphs.enabled = False  # replays would not call the kernel's Python function, which this counts
    ids = torch.randint(3, 100, (2, 9), device=DEVICE)

    def decode() -> torch.Tensor:
        out = model(ids[:, :5], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(5, 9):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
        return torch.cat(logits, dim=1)

    monkeypatch.setattr(TUNING, "grouped_projections", False)
    want = decode()
    calls = []
    kernel = dispatch.grouped_linear_triton
    monkeypatch.setattr(dispatch, "grouped_linear_triton", lambda *a: calls.append(len(a[1])) or kernel(*a))
    monkeypatch.setattr(TUNING, "grouped_projections", True)
    got = decode()
    layers = model.config.num_hidden_layers
    assert sorted(set(calls)) == [1, 2, 4] and len(calls) == 4 * layers * 5  # prefill and four steps: 4 a layer
    assert rel_err(got, want) <= 1e-5
