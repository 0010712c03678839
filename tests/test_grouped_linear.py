"""The grouped projection (t2r/kernels/grouped_linear.py; Triton's CPU interpreter here): several linear maps of one
input in one launch, against F.linear each; when decoding takes it (opt-in), and a model decoding through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

pytest.importorskip("triton")

from conftest import rel_err, tiny_gsa_model

from t2r.kernels import dispatch, grouped_linear
from t2r.kernels.grouped_linear import MAX_ROWS, geometry, grouped_linear_triton
from t2r.kernels.reference import grouped_linear_reference
from t2r.kernels.tuning import TUNING
from t2r.models import projections
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


def test_grouped_geometry_takes_narrow_tiles_where_wide_ones_would_not_fill_a_wave(monkeypatch):
    cpu = torch.device("cpu")  # counted as 132 multiprocessors
    assert geometry(576 + 3 * 192, 1, cpu) == (16, 256, 2)  # SmolLM2-135M's q/k/v/gates: 72 programs
    assert geometry(2 * 1536, 16, cpu) == (16, 256, 2)  # its gate/up: 96 wide tiles would leave SMs idle
    assert geometry(4096, 1, cpu) == (16, 256, 2)  # Mistral-7B's down projection: 128 wide tiles
    assert geometry(4096 + 2 * 1024 + 512, 16, cpu) == (32, 256, 2)  # its q/k/v/gates: 208 wide tiles
    assert geometry(14336, 1, cpu, glu=True) == (32, 128, 2)  # its activation's two weights a program: no spills
    assert geometry(1536, 16, cpu, glu=True) == (16, 128, 2)
    assert geometry(576, 64, cpu) == (16, 256, 4)  # past 16 rows: SmolLM2's output projection
    assert geometry(2 * 14336, 64, cpu) == (32, 128, 4)  # Mistral-7B's gate/up
    assert geometry(14336, 64, cpu, glu=True) == (16, 64, 4)
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
    monkeypatch.setattr(dispatch, "grouped_linear_triton", lambda *a, **kw: calls.append(len(a[1])) or kernel(*a, **kw))
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


@pytest.mark.parametrize(
    ("dtype", "rows", "K", "sizes", "bias", "norm", "glu", "residual"),
    [(torch.float32, (2, 1), 200, (40, 24), True, True, False, False),
     (torch.float32, (5,), 130, (48, 48), "some", False, True, False),
     (torch.float32, (33,), 96, (24,), True, True, False, True),
     (torch.bfloat16, (16, 1), 576, (64, 32, 32, 16), False, True, False, False),
     (torch.bfloat16, (3,), 160, (72, 72), False, True, True, False),
     (torch.bfloat16, (1,), 300, (40,), False, False, False, True)],
)  # fmt: skip
def test_grouped_projection_takes_its_neighbours_in_its_launch(dtype, rows, K, sizes, bias, norm, glu, residual):
    """The decoding step's neighbours inside the launch (``TUNING.fused_maps``), against the reference's separate
    calls: the RMSNorm before (its statistics over inner sizes that are not whole blocks, rows that are a slice of
    wider ones, with biases after), an MLP's silu(gate) * up of its two maps (with the up map's bias alone, and
    after a norm), the residual after."""
    wide = torch.randn(*rows, K + 8, device=DEVICE).to(dtype) * 3
    x = wide[..., 4 : 4 + K]
    weights = tuple((torch.randn(n, K, device=DEVICE) / K**0.5).to(dtype) for n in sizes)
    biases = tuple(torch.randn(n, device=DEVICE).to(dtype) if bias is True or (bias and i % 2) else None
                   for i, n in enumerate(sizes))  # fmt: skip
    kw = {
        "norm": (torch.rand(K, device=DEVICE).to(dtype) + 0.5, 1e-5) if norm else None,
        "glu": glu,
        "residual": torch.randn(*rows, sizes[0], device=DEVICE).to(dtype) if residual else None,
    }
    got = grouped_linear_triton(x, weights, biases, **kw)
    want = grouped_linear_reference(x, weights, biases, **kw)
    plain = grouped_linear_reference(x, weights, biases)
    assert len(got) == len(want) == (1 if glu else len(sizes))
    # bf16: the reference rounds its normalised rows, the launch not; the interpreter's bf16 casts truncate (measured:
    # 1.8% from the fp32 truth at norm + activation, where four roundings meet, against the reference's 0.5%).
    tol = 1e-5 if dtype == torch.float32 else 3e-2 if glu and DEVICE == "cpu" else 1e-2
    for a, b, c in zip(got, want, plain, strict=False):
        assert a.shape == b.shape and a.dtype == dtype and a.is_contiguous()
        assert rel_err(a, b) <= tol and rel_err(b, c) > 0.05  # the neighbours changed the result


def test_grouped_projection_says_which_neighbours_it_cannot_take():
    x = torch.randn(2, 16, device=DEVICE)
    w = torch.randn(8, 16, device=DEVICE)
    for weights, kw, why in (
        ((w,), {"norm": (torch.ones(8, device=DEVICE), 1e-6)}, "norm weight must be"),
        ((w,), {"glu": True}, "activation takes two maps of one shape"),
        ((w, w[:4]), {"glu": True}, "activation takes two maps of one shape"),
        ((w, w), {"residual": torch.zeros(2, 8, device=DEVICE)}, "adds a residual to one map's output"),
        ((w,), {"residual": torch.zeros(2, 9, device=DEVICE)}, "adds a residual to one map's output"),
    ):
        with pytest.raises(ValueError, match=why):
            grouped_linear_triton(x, weights, (None,) * len(weights), **kw)


def _decode(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a 5-token prefill and four single-token steps on the cache."""
    out = model(ids[:, :5], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, dim=1)


def _count_grouped_calls(monkeypatch) -> list[tuple[int, bool, bool, bool]]:
    """Each grouped launch from now on: (weights, with a norm, with the activation, with a residual)."""
    calls = []
    kernel = dispatch.grouped_linear_triton

    def counted(x, weights, biases, **kw):
        calls.append((len(weights), kw.get("norm") is not None, bool(kw.get("glu")), kw.get("residual") is not None))
        return kernel(x, weights, biases, **kw)

    monkeypatch.setattr(dispatch, "grouped_linear_triton", counted)
    return calls


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
    monkeypatch.setattr(TUNING, "fused_maps", False)
    monkeypatch.setattr(TUNING, "grouped_projections", False)
    want = _decode(model, ids)
    calls = _count_grouped_calls(monkeypatch)
    monkeypatch.setattr(TUNING, "grouped_projections", True)
    got = _decode(model, ids)
    layers = model.config.num_hidden_layers
    assert sorted({n for n, *_ in calls}) == [1, 2, 4] and len(calls) == 4 * layers * 5  # prefill, 4 steps: 4 a layer
    assert not any(norm or glu or residual for _, norm, glu, residual in calls)  # fused maps off
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize(
    ("arch", "gsa"), [("mistral", {}), ("qwen2", dict(gsa_window=4, gsa_full_attention_layers=[1]))], ids=str
)
def test_decoding_takes_the_layers_norms_and_residual_adds_into_the_projections(arch, gsa, monkeypatch):
    """``TUNING.fused_maps`` (on by default): the same logits as without. Per forward, a GSA layer's three norms
    (its input's, its output's, its MLP's) went into the q/k/v/gates, output and gate/up launches, the MLP's
    activation into the gate/up launch, and both residual adds into the output and down projections'. A hybrid
    layer applies its input's and output's norms itself (its window reads them); a layer kept as softmax attention
    runs transformers' own forward, only its MLP's activation fused."""
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    model = tiny_gsa_model(arch, **gsa).to(DEVICE)
    model.decode_graphs.enabled = False
    for name, p in model.named_parameters():  # norms that differ from one another (their init is all ones)
        if "norm" in name:
            p.uniform_(0.5, 1.5)
    ids = torch.randint(3, 100, (2, 9), device=DEVICE)
    monkeypatch.setattr(TUNING, "fused_maps", False)
    want = _decode(model, ids)
    calls = _count_grouped_calls(monkeypatch)
    monkeypatch.setattr(TUNING, "fused_maps", True)
    got = _decode(model, ids)
    expected = [0, 0, 0]  # (norms, activations, residuals) a forward
    for i in range(model.config.num_hidden_layers):
        if not model.config.is_gsa_layer(i):
            per_layer = (0, 1, 0)
        else:
            per_layer = (1, 1, 2) if model.config.gsa_window else (3, 1, 2)
        expected = [a + b for a, b in zip(expected, per_layer, strict=True)]
    counted = [sum(call[j] for call in calls) for j in (1, 2, 3)]
    assert counted == [5 * n for n in expected]
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_a_wide_inputs_norm_keeps_its_launch_and_the_rest_still_folds(monkeypatch):
    """Past ``FOLDED_NORM_MAX`` inputs the RMSNorm runs on its own (every program of the grouped launch would
    recompute it); the MLP's activation still goes into the gate/up launch, and the result is the same."""
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    K = 48
    norm = LlamaRMSNorm(K, eps=1e-6).to(DEVICE)
    norm.weight.uniform_(0.5, 1.5)
    maps = (nn.Linear(K, 32, bias=False).to(DEVICE), nn.Linear(K, 32, bias=False).to(DEVICE))
    x = torch.randn(3, K, device=DEVICE)
    want = project(x, maps, norm=norm, glu=True)
    calls = _count_grouped_calls(monkeypatch)
    monkeypatch.setattr(TUNING, "fused_maps", True)
    for widest, folded in ((K, True), (K - 1, False)):
        monkeypatch.setattr(projections, "FOLDED_NORM_MAX", widest)
        (got,) = project(x, maps, norm=norm, glu=True)
        assert calls.pop() == (2, folded, True, False) and not calls
        assert rel_err(got, want[0]) <= 1e-5


def test_decoder_layers_fuse_their_neighbours_only_where_nothing_would_notice(monkeypatch):
    """Fused maps on, no autograd, a GSA attention: fused; a layer kept as softmax attention, autograd on, the maps
    off, or a hook on the attention (which would see the residual in its output) or the MLP: transformers'
    forward."""
    model = tiny_gsa_model("mistral", gsa_full_attention_layers=[1])
    gsa_layer, softmax_layer = model.model.layers[0], model.model.layers[1]
    monkeypatch.setattr(TUNING, "fused_maps", True)
    with torch.no_grad():
        assert gsa_layer._fuses_neighbours() and not softmax_layer._fuses_neighbours()
        for module in (gsa_layer.self_attn, gsa_layer.mlp):
            handle = module.register_forward_hook(lambda *a: None)
            assert not gsa_layer._fuses_neighbours()
            handle.remove()
        assert gsa_layer._fuses_neighbours()
        monkeypatch.setattr(TUNING, "fused_maps", False)
        assert not gsa_layer._fuses_neighbours()
    monkeypatch.setattr(TUNING, "fused_maps", True)
    assert not gsa_layer._fuses_neighbours()  # autograd on
