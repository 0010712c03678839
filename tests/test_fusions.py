"""The fusions of inference (Triton; the CPU interpreter here): RMSNorm and the rotary embedding against transformers'
own and the references, the hybrid's window step against its reference, and the converted model's norms: which get
the fused forward, and when it runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from conftest import rel_err, tiny_gsa_model

from t2r.kernels.dispatch import rotary
from t2r.kernels.norm import rms_norm_autograd_triton, rms_norm_triton
from t2r.kernels.prologue import gsa_prologue_triton
from t2r.kernels.reference import (
    gsa_prologue_reference,
    rms_norm_reference,
    rotary_reference,
    swiglu_reference,
    window_decode_reference,
)
from t2r.kernels.rotary import rotary_triton
from t2r.kernels.swiglu import swiglu_triton
from t2r.kernels.tuning import TUNING
from t2r.kernels.window import window_decode_triton
from t2r.models.fused import FusedDecoderLayer, FusedMLP, FusedRMSNorm, fuse_modules
from t2r.models.projections import project

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("dtype", "wdtype", "shape"),
    [(torch.float32, torch.float32, (3, 5, 48)), (torch.bfloat16, torch.bfloat16, (2, 1, 576)),
     (torch.bfloat16, torch.float32, (7, 64)), (torch.float16, torch.float16, (1, 1, 1, 100))],
)  # fmt: skip
def test_fused_rms_norm_matches_the_reference(dtype, wdtype, shape):
    """Rows of any count and width (not only powers of two); the output's dtype as PyTorch promotes it; fp32 to
    rounding, half precision to its last bit."""
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(wdtype)
    got, want = rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel_err(got, want) <= tol


@pytest.mark.parametrize(
    ("dtype", "wdtype", "shape", "weight_grad"),
    [(torch.float32, torch.float32, (3, 5, 48), True), (torch.bfloat16, torch.bfloat16, (37, 576), True),
     (torch.float32, torch.float32, (2, 70, 100), True), (torch.bfloat16, torch.float32, (9, 64), False),
     (torch.float16, torch.float16, (1, 1, 1, 100), True)],
)  # fmt: skip
def test_fused_rms_norm_gradients_match_the_reference(dtype, wdtype, shape, weight_grad):
    """The autograd form against the reference's autograd in fp64: rows of any count (more than the backward's
    programs, not a multiple of them) and width, a frozen weight (LoRA) getting no gradient; fp32 to rounding, half
    precision within its rounding (the reference rounds its intermediate gradients to it; the kernel does not)."""
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(wdtype).requires_grad_(weight_grad)
    dy = torch.randn(shape, device=DEVICE)
    got = rms_norm_autograd_triton(x, w, 1e-5)
    got.backward(dy.to(got.dtype))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = rms_norm_reference(x64, w64, 1e-5)
    want.backward(dy.to(got.dtype).double())
    assert got.dtype == torch.promote_types(dtype, wdtype) and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel_err(got, want) <= tol
    assert rel_err(x.grad, x64.grad) <= tol
    if weight_grad:
        assert w.grad.dtype == wdtype and rel_err(w.grad, w64.grad) <= tol
    else:
        assert w.grad is None


def _projections(dtype, B, T, H, Hkv, D, M, layout):
    """q, k, v, f as a layer makes them: views of separate projections, of one wider projection ("merged"), or
    the last token of longer rows ("last")."""
    widths = [H * D, Hkv * D, Hkv * D, Hkv * M]
    if layout == "merged":
        parts = (torch.randn(B, T, sum(widths), device=DEVICE) * 2).to(dtype).split(widths, dim=-1)
    elif layout == "last":
        parts = [(torch.randn(B, T + 3, w, device=DEVICE) * 2).to(dtype)[:, -T:] for w in widths]
    else:
        parts = [(torch.randn(B, T, w, device=DEVICE) * 2).to(dtype) for w in widths]
    heads = [(H, D), (Hkv, D), (Hkv, D), (Hkv, M)]
    return [p.view(B, T, *h) if p.is_contiguous() else p.unflatten(-1, h) for p, h in zip(parts, heads, strict=True)]


@pytest.mark.parametrize(
    ("dtype", "feature_map", "B", "T", "H", "Hkv", "D", "M", "layout", "padded"),
    [(torch.float32, "swish", 2, 5, 4, 2, 16, 16, "separate", False),
     (torch.bfloat16, "swish", 2, 7, 9, 3, 64, 64, "merged", True),
     (torch.float32, "relu", 3, 1, 6, 6, 32, 16, "last", True),
     (torch.float32, "identity", 1, 4, 4, 1, 16, 32, "merged", False)],
)  # fmt: skip
def test_fused_prologue_matches_the_reference(dtype, feature_map, B, T, H, Hkv, D, M, layout, padded):
    """The GSA op's inputs and their gradients back to the projections, against the reference's autograd in fp64:
    each feature map, padding (a [B, T] slice of a longer mask) that neither writes nor decays, projections that
    are views with gaps between tokens; strongly and weakly forgetting gate logits."""
    proj = [x.requires_grad_() for x in _projections(dtype, B, T, H, Hkv, D, M, layout)]
    keep = (torch.rand(B, T + 2, device=DEVICE) > 0.3)[:, -T:] if padded else None
    got = gsa_prologue_triton(*proj, feature_map, 8.0, keep)
    ups = [torch.randn(x.shape, device=DEVICE).to(x.dtype) for x in got]
    torch.autograd.backward(got, ups)
    proj64 = [x.detach().double().requires_grad_() for x in proj]
    want = gsa_prologue_reference(*proj64, feature_map, 8.0, keep)
    torch.autograd.backward(want, [u.double() for u in ups])
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for name, a, b in zip("qkvsg", got, want, strict=True):
        assert a.shape == b.shape and a.dtype == (torch.float32 if name in "sg" else dtype), name
        assert rel_err(a, b) <= (1e-6 if name in "sg" else tol), name
    for name, a, b in zip(("dq", "dk", "dv", "df"), proj, proj64, strict=True):
        assert rel_err(a.grad, b.grad) <= tol, name
    if padded:
        assert not got[3][~keep].any() and not got[4][~keep].any() and not proj[3].grad[~keep].any()
    with torch.no_grad():  # without autograd: the forward alone, the same values
        again = gsa_prologue_triton(*proj, feature_map, 8.0, keep)
        assert all(torch.equal(a, b) for a, b in zip(again, got, strict=True))


@pytest.mark.parametrize(
    ("dtype", "shape", "layout"),
    [(torch.float32, (3, 5, 100), "separate"), (torch.bfloat16, (2, 7, 1536), "merged"),
     (torch.float32, (4, 1, 2100), "last"), (torch.float16, (9, 64), "merged")],
)  # fmt: skip
def test_fused_swiglu_matches_the_reference(dtype, shape, layout):
    """silu(gate) * up and its gradients against the reference's autograd in fp64: widths beyond one block of
    columns and not multiples of it, gate and up as halves of one merged projection or last tokens of longer rows;
    without autograd the same values."""
    if layout == "merged":
        both = (torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE) * 3).to(dtype)
        gate, up = (x.requires_grad_() for x in both.split(shape[-1], dim=-1))
    elif layout == "last":
        longer = [(torch.randn(shape[0], 4, shape[-1], device=DEVICE) * 3).to(dtype) for _ in range(2)]
        gate, up = (x[:, -1:].requires_grad_() for x in longer)
    else:
        gate, up = ((torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_() for _ in range(2))
    got = swiglu_triton(gate, up)
    dh = torch.randn(got.shape, device=DEVICE).to(dtype)
    got.backward(dh)
    g64, u64 = (x.detach().double().requires_grad_() for x in (gate, up))
    want = swiglu_reference(g64, u64)
    want.backward(dh.double())
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert got.dtype == dtype and rel_err(got, want) <= tol
    assert rel_err(gate.grad, g64.grad) <= tol and rel_err(up.grad, u64.grad) <= tol
    with torch.no_grad():
        assert torch.equal(swiglu_triton(gate, up), got)


@pytest.mark.parametrize("bias", [False, True])
def test_merged_projections_match_the_modules(bias, monkeypatch):
    """Under autograd, merged projections give each module's output and every parameter's gradient as separate
    calls do; without autograd, or for a module that is not a plain nn.Linear (peft's layers), one with a hook,
    or biases on some only, each module runs itself."""
    monkeypatch.setattr(TUNING, "merged_projections", True)
    monkeypatch.setattr(TUNING, "grouped_projections", False)  # without autograd: the modules' own calls, counted
    mods = tuple(nn.Linear(24, n, bias=bias) for n in (16, 8, 8, 12))
    x = torch.randn(2, 5, 24, requires_grad=True)
    calls = []
    for m in mods:
        m.forward = lambda x, _m=m: calls.append(1) or nn.Linear.forward(_m, x)  # counts separate calls
    merged = project(x, mods)
    assert not calls and [o.shape[-1] for o in merged] == [16, 8, 8, 12]
    dys = [torch.randn(o.shape) for o in merged]
    torch.autograd.backward(merged, dys)
    got = [x.grad.clone()] + [p.grad.clone() for m in mods for p in m.parameters()]
    x.grad = None
    for m in mods:
        m.zero_grad()
    separate = [nn.Linear.forward(m, x) for m in mods]
    torch.autograd.backward(separate, dys)
    want = [x.grad] + [p.grad for m in mods for p in m.parameters()]
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(merged, separate, strict=True))
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(got, want, strict=True))
    with torch.no_grad():
        project(x, mods)
    assert len(calls) == 4
    calls.clear()
    frozen = mods[1].weight.requires_grad_(False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved = []
        merged = project(x, mods)
    # the backward concatenates the weights again: nothing is kept but x and the modules' own weights
    assert {t.data_ptr() for t in saved} <= {x.data_ptr()} | {m.weight.data_ptr() for m in mods}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients in autocast's dtype, returned in the params'
        x.grad = None
        for m in mods:
            m.zero_grad()
        torch.autograd.backward(project(x, mods), dys)
        got = [x.grad] + [p.grad for m in mods for p in m.parameters() if p.requires_grad]
        x.grad = None
        for m in mods:
            m.zero_grad()
        torch.autograd.backward([nn.Linear.forward(m, x) for m in mods], dys)
        want = [x.grad] + [p.grad for m in mods for p in m.parameters() if p.requires_grad]
    assert frozen.grad is None and all(g.dtype == torch.float32 for g in got)
    assert all(rel_err(a, b) <= 1e-2 for a, b in zip(got, want, strict=True))
    frozen.requires_grad_(True)
    calls.clear()

    class LoraLike(nn.Linear):
        pass

    odd = (LoraLike(24, 16, bias=bias), *mods[1:])
    project(x, odd)
    assert len(calls) == 3
    calls.clear()
    handle = mods[0].register_forward_hook(lambda *a: None)
    project(x, mods)
    assert len(calls) == 4
    handle.remove()
    calls.clear()
    project(x, (nn.Linear(24, 16, bias=not bias), *mods[1:]))
    assert len(calls) == 3


TRAINING_CASES = {  # switch: (architecture, hybrid options, what must run with it on)
    "fused_norm_grad": ("qwen3", {}, {"rms_norm_autograd_triton"}),  # also Qwen3's q/k norms
    "fused_prologue": ("llama", {}, {"gsa_prologue_triton"}),
    "fused_mlp": ("mistral", {}, {"swiglu_triton"}),
    "merged_projections": ("qwen2", {}, {"merged"}),  # q/k/v biases, a gate without one: only gate/up merge
    "all": ("qwen2", dict(gsa_window=4, gsa_window_sink=True),
            {"rms_norm_autograd_triton", "gsa_prologue_triton", "swiglu_triton", "merged"}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_training_fusions_are_opt_in_and_exact(case, monkeypatch):
    """Each training fusion (and all four on a hybrid) gives a model with left padding the loss and every
    gradient of the unfused model; off, none of the fused paths runs."""
    from t2r.kernels import dispatch
    from t2r.kernels.tuning import TRAINING_FUSIONS
    from t2r.models import projections

    arch, hybrid, expected = TRAINING_CASES[case]
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "reference")  # the GSA op in PyTorch: only the fusions differ
        monkeypatch.setattr(dispatch, "_fusable", lambda *t: True)
    model = tiny_gsa_model(arch, **hybrid).to(DEVICE).train()
    ids = torch.randint(3, 100, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    calls = []
    for name in ("rms_norm_autograd_triton", "gsa_prologue_triton", "swiglu_triton"):
        fused = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _f=fused, _n=name: calls.append(_n) or _f(*a))
    mergeable = projections._mergeable
    monkeypatch.setattr(projections, "_mergeable", lambda m: mergeable(m) and not calls.append("merged"))
    results = []
    for on in (False, True):
        for flag in TRAINING_FUSIONS:
            monkeypatch.setattr(TUNING, flag, on and (case == "all" or flag == case))
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        assert set(calls) == (expected if on else set())
    (loss0, grads0), (loss1, grads1) = results
    assert rel_err(loss1, loss0) <= 1e-6 and grads0.keys() == grads1.keys()
    assert max(rel_err(grads1[n], grads0[n]) for n in grads0) <= 1e-5


def test_reference_is_transformers_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    x = torch.randn(4, 33, dtype=torch.bfloat16)
    for cls in (LlamaRMSNorm, Qwen3RMSNorm):
        norm = cls(33, eps=1e-6)
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-6))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_converted_models_norms_are_fused_where_nothing_differentiates(arch, monkeypatch):
    """Every norm (layers, final, g_norm, Qwen3's q/k norms) keeps its class (isinstance) and parameters; without
    autograd it runs the kernel, with it the differentiable reference (the gradients reach the weight). Every MLP
    and decoder layer gets its fused forward too."""
    model = tiny_gsa_model(arch).to(DEVICE)
    norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    per_layer = 3 + 2 * (arch == "qwen3")  # input, post-attention, g_norm (+ q/k norms)
    assert len(norms) == per_layer * model.config.num_hidden_layers + 1
    mlps = [m for m in model.modules() if isinstance(m, FusedMLP)]
    layers = [m for m in model.modules() if isinstance(m, FusedDecoderLayer)]
    assert len(mlps) == len(layers) == model.config.num_hidden_layers
    assert fuse_modules(model) == len(norms) + len(mlps) + len(layers)  # idempotent
    first = model.model.layers[0].input_layernorm
    stock = type(first).__mro__[2]
    assert isinstance(first, stock) and stock.__name__.endswith("RMSNorm")
    calls = []
    monkeypatch.setattr("t2r.kernels.dispatch.rms_norm_triton", lambda *a: calls.append(1) or rms_norm_triton(*a))
    if DEVICE == "cpu":  # the interpreter; CUDA tensors take the kernel by default
        monkeypatch.setattr(TUNING, "impl", "triton")
    x = torch.randn(2, 3, model.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        assert rel_err(first(x), stock.forward(first, x)) <= 1e-6 and calls
    calls.clear()
    first(x).sum().backward()
    assert not calls and first.weight.grad is not None


def test_norms_of_other_math_are_left_alone():
    class GemmaLikeRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    model = nn.Sequential(GemmaLikeRMSNorm())
    assert fuse_modules(model) == 0 and type(model[0]) is GemmaLikeRMSNorm


@pytest.mark.parametrize(
    ("dtype", "B", "T", "H", "Hkv", "D", "shared"),
    [(torch.float32, 2, 5, 4, 2, 16, False), (torch.bfloat16, 3, 1, 9, 3, 64, False),
     (torch.float32, 2, 3, 6, 6, 32, True)],
)  # fmt: skip
def test_fused_rotary_matches_the_reference(dtype, B, T, H, Hkv, D, shared):
    """Query and key heads of any count (not powers of two), one token or several, cos / sin per row or one table
    for all rows (position ids shared by the batch)."""
    q = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    k = torch.randn(B, T, Hkv, D, device=DEVICE).to(dtype)
    angles = torch.rand(1 if shared else B, T, D // 2, device=DEVICE) * 50
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    got, want = rotary_triton(q, k, cos, sin), rotary_reference(q, k, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and rel_err(a, b) <= tol


def test_rotary_reference_is_transformers_and_dispatch_takes_it_under_autograd(monkeypatch):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = torch.randn(2, 4, 6, 8, device=DEVICE, requires_grad=True)
    k, cos, sin = (
        torch.randn(2, 4, 3, 8, device=DEVICE),
        torch.randn(2, 4, 8, device=DEVICE),
        torch.randn(2, 4, 8, device=DEVICE),
    )
    want = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    assert all(torch.equal(a, b) for a, b in zip(rotary_reference(q, k, cos, sin), want, strict=True))
    calls = []
    monkeypatch.setattr("t2r.kernels.dispatch.rotary_triton", lambda *a: calls.append(1) or rotary_triton(*a))
    monkeypatch.setattr(TUNING, "fused_rope", False)  # T2R_GSA_FUSED_ROPE=0 (on by default since it ran on a GPU)
    with torch.no_grad():
        rotary(q, k, cos, sin)
    assert not calls
    monkeypatch.setattr(TUNING, "fused_rope", True)
    if DEVICE == "cpu":  # the interpreter; CUDA tensors take the kernel by default
        monkeypatch.setattr(TUNING, "impl", "triton")
    rotary(q, k, cos, sin)[0].sum().backward()  # q needs a gradient: the reference
    assert not calls and q.grad is not None
    with torch.no_grad():
        got = rotary(q, k, cos, sin)
    assert calls and all(rel_err(a, b) <= 1e-6 for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(
    ("dtype", "sink", "mask", "per_token", "D"),
    [(torch.float32, True, "long", "logits", 16), (torch.float32, False, None, None, 16),
     (torch.bfloat16, True, "bool", "read", 16), (torch.bfloat16, False, None, "logits", 8),
     (torch.float32, True, "bool", "read", 64)],
)  # fmt: skip
def test_fused_window_step_matches_its_reference(dtype, sink, mask, per_token, D):
    """The window's attention over its ring's real slots (the sink's too) and the new token (a padding one too), the mix
    (per head, per token, or per head plus the router's read of the hidden state), and the ring updated in place: the
    new token over each row's oldest slot, the head moved on. Rings that are views of longer tensors, 1 + 37 slots (the
    kernel's slot parts: one full tile, one partial), heads at the first, a middle and the last slot, a row whose first
    part holds no valid slot (without a sink: the part's softmax is empty); GQA groups of 3; head dims below the
    kernel's least tile (8: padded) and above it."""
    B, H, Hkv, W = 3, 6, 2, 37
    longer = [torch.randn(B, W + 6, Hkv, D, device=DEVICE).to(dtype) for _ in range(2)]
    valid = torch.ones(B, W + 1, dtype=torch.bool, device=DEVICE)
    valid[:, 0] = sink
    valid[1, 1:34] = False  # a left-padded row
    past = (longer[0][:, 5:], longer[1][:, 5:], valid, torch.tensor([1, 20, W], device=DEVICE))
    q = torch.randn(B, 1, H, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, 1, Hkv, D, device=DEVICE).to(dtype) for _ in range(2))
    o = torch.randn(B, 1, H, D, device=DEVICE).to(dtype)
    mix = torch.randn(B, 1, H, device=DEVICE) if per_token == "logits" else torch.randn(H, device=DEVICE).to(dtype)
    read = ()  # the router's read of the hidden state, made by the kernel: C = 200 spans two of its column blocks
    if per_token == "read":
        read = (torch.randn(H, 200, device=DEVICE).to(dtype) / 10, torch.randn(B, 1, 200, device=DEVICE).to(dtype))
    keep = None
    if mask is not None:
        full = torch.ones(B, 9, dtype=getattr(torch, mask), device=DEVICE)
        full[2, -1] = 0
        keep = full[:, -1:]
    ref_past = tuple(x.clone() for x in past)
    before = longer[0][:, :5].clone()
    want = window_decode_reference(q, k, v, ref_past, keep, 0.25, o, mix, *read)
    got = window_decode_triton(q, k, v, past, keep, 0.25, o, mix, *read)
    assert got.dtype == want.dtype and rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 8e-3)
    for a, b in zip(past, ref_past, strict=True):  # the ring's update moves values: bit for bit
        assert torch.equal(a, b)
    assert past[3].tolist() == [2, 21, 1]
    assert torch.equal(longer[0][:, :5], before)  # slots before the view: untouched
    assert past[2][2, W].item() is (mask is None) and torch.equal(past[0][2, W], k[2, 0])


def test_window_parts_fill_the_device_in_whole_tiles():
    """Slot parts per (row, KV head): two programs per multiprocessor where the ring has the tiles for it; tiles
    small enough for a group's products not to spill."""
    from t2r.kernels.window import window_parts

    assert window_parts(3, 513, 132) == 17  # one sequence of SmolLM2's 3 KV heads, W = 512: every tile its own
    assert window_parts(48, 513, 132) == 6  # 16 sequences
    assert window_parts(1024, 513, 132) == 1
    assert window_parts(3, 32, 132) == 1
    assert window_parts(8, 513, 132, 16) == 33  # one sequence of Mistral-7B's 8 KV heads


def test_window_step_dispatch_can_be_turned_off_and_falls_back_where_the_kernel_cannot_go(monkeypatch):
    """The fused window step runs by default where it can (T2R_GSA_FUSED_WINDOW=0 turns it off), never for
    gradients."""
    from t2r.kernels.dispatch import window_decode_

    calls = []
    monkeypatch.setattr(
        "t2r.kernels.dispatch.window_decode_triton", lambda *a: calls.append(1) or window_decode_triton(*a)
    )
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    B, H, Hkv, D, P = 2, 4, 2, 16, 5

    def step(requires_grad=False):
        past = (torch.randn(B, P, Hkv, D, device=DEVICE), torch.randn(B, P, Hkv, D, device=DEVICE),
                torch.ones(B, P, dtype=torch.bool, device=DEVICE),
                torch.ones(B, dtype=torch.long, device=DEVICE))  # fmt: skip
        q = torch.randn(B, 1, H, D, device=DEVICE, requires_grad=requires_grad)
        k, v, o = (
            torch.randn(B, 1, Hkv, D, device=DEVICE),
            torch.randn(B, 1, Hkv, D, device=DEVICE),
            torch.randn_like(q),
        )
        return window_decode_(q, k, v, past, None, 0.25, o, torch.zeros(H, device=DEVICE))

    monkeypatch.setattr(TUNING, "fused_window", False)
    with torch.no_grad():
        step()
    assert not calls
    monkeypatch.setattr(TUNING, "fused_window", True)
    step(requires_grad=True)
    assert not calls
    with torch.no_grad():
        step()
    assert calls == [1]


def test_host_block_sizes_are_tritons():
    """The launchers' plain-Python block sizes (Triton's own helpers cost ~2 us per host call) agree with Triton's."""
    import triton

    from t2r.kernels.layout import cdiv, next_pow2

    for n in range(0, 1100):
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 16, 64, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def _window_step_inputs(B=2, H=4, Hkv=2, D=16, P=7):
    torch.manual_seed(3)
    valid = torch.ones(B, P, dtype=torch.bool, device=DEVICE)
    valid[1, 1:4] = False
    past = (torch.randn(B, P, Hkv, D, device=DEVICE), torch.randn(B, P, Hkv, D, device=DEVICE), valid,
            torch.tensor([2, P - 1], device=DEVICE))  # fmt: skip
    q, o = (torch.randn(B, 1, H, D, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(B, 1, Hkv, D, device=DEVICE) for _ in range(2))
    return q, k, v, o, past, torch.randn(H, device=DEVICE)


def _router_read(B=2, H=4, C=24):
    """A hybrid router's weight [H, C] and the hidden states [B, 1, C] it reads."""
    return torch.randn(H, C, device=DEVICE) / 4, torch.randn(B, 1, C, device=DEVICE)


def test_the_window_step_op_passes_torch_opcheck(monkeypatch):
    """Schema (the ring's four tensors declared as written), and the fake implementation against the real one."""
    from t2r.kernels.window import window_decode_op

    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    q, k, v, o, past, mix = _window_step_inputs()
    keep = torch.ones(2, 1, dtype=torch.long, device=DEVICE)
    for read in ((None, None), _router_read()):
        ring = tuple(x.clone() for x in past)
        torch.library.opcheck(window_decode_op, (q, k, v, *ring, keep, 0.25, o, mix, *read))


def test_a_compiled_window_step_keeps_the_fused_kernels_in_its_graph(monkeypatch):
    """Under torch.compile (the compiled decoding step) the fused step runs as the custom op, inside one graph
    (fullgraph: no break), with the reference's output and ring."""
    import torch._dynamo

    from t2r.kernels import dispatch
    from t2r.kernels import window as window_module
    from t2r.kernels.dispatch import window_decode_

    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    calls = []
    for module, how in ((window_module, "op"), (dispatch, "direct")):
        monkeypatch.setattr(
            module, "window_decode_triton", lambda *a, how=how: calls.append(how) or window_decode_triton(*a)
        )
    q, k, v, o, past, mix = _window_step_inputs()
    read = _router_read()
    ref_past = tuple(x.clone() for x in past)
    want = window_decode_reference(q, k, v, ref_past, None, 0.25, o, mix, *read)
    torch._dynamo.reset()
    step = torch.compile(window_decode_, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = step(q, k, v, past, None, 0.25, o, mix, *read)
    torch._dynamo.reset()
    assert calls == ["op"]  # traced: through the custom op, not the eager call
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(past, ref_past, strict=True):
        assert torch.equal(a, b)
