"""The chunked GSA reference against the token-by-token oracle, and the oracle against the GSA definition."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, rel_err, run_with_grads

from t2r.kernels import gsa, gsa_chunk, gsa_recurrent


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("M", [16, 64])
@pytest.mark.parametrize("group", [1, 3])
def test_chunk_matches_recurrent(dtype, tol, M, group):
    Hkv = 2
    inputs, h0 = make_inputs(B=2, T=83, H=Hkv * group, Hkv=Hkv, K=32, V=24, M=M, dtype=dtype)
    ref = run_with_grads(gsa_recurrent, inputs, h0)
    out = run_with_grads(gsa_chunk, inputs, h0)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    for name, a, b in zip(["o", "hk", "hv"], out[:3], ref[:3], strict=True):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    for name, a, b in zip(["dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"], out[3], ref[3], strict=True):
        assert a.dtype == b.dtype
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


@pytest.mark.parametrize("gate_scale", [30.0, 1e4])
def test_chunk_stable_under_extreme_forgetting(gate_scale):
    inputs, h0 = make_inputs(B=1, T=70, H=4, Hkv=2, K=16, V=16, M=16, gate_scale=gate_scale)
    o_ref, h_ref = gsa_recurrent(*inputs, 1.0, h0, True)
    o, h = gsa_chunk(*inputs, 1.0, h0, True)
    assert torch.isfinite(o).all()
    assert rel_err(o, o_ref) <= 1e-5
    assert rel_err(h[1], h_ref[1]) <= 1e-5


def test_recurrent_matches_definition_per_query_head():
    """Oracle check written independently: repeat K/V/gates per query head and run the GSA equations."""
    B, T, H, Hkv, K, V, M = 1, 9, 4, 2, 8, 6, 5
    (q, k, v, s, g), _ = make_inputs(B, T, H, Hkv, K, V, M, state=False)
    G = H // Hkv
    o, _ = gsa_recurrent(q, k, v, s, g, 0.7)
    for h in range(H):
        j = h // G
        Kt, Vt = torch.zeros(M, K), torch.zeros(M, V)  # memories as in the paper: slots x dims
        for t in range(T):
            a = g[0, t, j].exp()
            Kt = a[:, None] * Kt + s[0, t, j][:, None] * k[0, t, j][None, :]
            Vt = a[:, None] * Vt + s[0, t, j][:, None] * v[0, t, j][None, :]
            expect = Vt.T @ torch.softmax(0.7 * (Kt @ q[0, t, h]), dim=0)
            assert rel_err(o[0, t, h], expect) <= 1e-5


@pytest.mark.parametrize("fn", [gsa_chunk, gsa_recurrent, gsa])
def test_split_with_state_handover_equals_one_call(fn):
    inputs, h0 = make_inputs(B=2, T=75, H=6, Hkv=2, K=16, V=20, M=16)
    o, h = fn(*inputs, 1.0, h0, True)
    cut = 41
    o1, h1 = fn(*(x[:, :cut] for x in inputs), 1.0, h0, True)
    o2, h2 = fn(*(x[:, cut:] for x in inputs), 1.0, h1, True)
    assert rel_err(torch.cat([o1, o2], 1), o) <= 1e-5
    assert rel_err(h2[0], h[0]) <= 1e-5 and rel_err(h2[1], h[1]) <= 1e-5


@pytest.mark.parametrize("fn", [gsa_chunk, gsa_recurrent])
def test_packed_varlen_equals_separate_calls(fn):
    lengths = [5, 70, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs, h0 = make_inputs(B=1, T=sum(lengths), H=6, Hkv=3, K=16, V=8, M=16, N=len(lengths))
    o, (hk, hv) = fn(*inputs, 1.0, h0, True, cu_seqlens=cu)
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        o_i, (hk_i, hv_i) = gsa_recurrent(
            *(x[:, lo:hi] for x in inputs), 1.0, (h0[0][i : i + 1], h0[1][i : i + 1]), True
        )
        assert rel_err(o[:, lo:hi], o_i) <= 1e-5
        assert rel_err(hk[i], hk_i[0]) <= 1e-5 and rel_err(hv[i], hv_i[0]) <= 1e-5


def test_packed_documents_do_not_leak():
    """Changing one document's tokens must not change another document's outputs."""
    cu = torch.tensor([0, 30, 64])
    inputs, _ = make_inputs(B=1, T=64, H=2, Hkv=1, K=8, V=8, M=16, state=False)
    o, _ = gsa_chunk(*inputs, 1.0, None, False, cu_seqlens=cu)
    changed = [x.detach().clone() for x in inputs]
    for x in changed[:3]:
        x[:, :30] = torch.randn_like(x[:, :30])
    o2, _ = gsa_chunk(*changed, 1.0, None, False, cu_seqlens=cu)
    assert torch.equal(o[:, 30:], o2[:, 30:])
    assert not torch.allclose(o[:, :30], o2[:, :30])


def test_zero_write_and_decay_leave_state_unchanged():
    """Padding convention used by the model: s = 0 and g = 0 tokens do not touch the memories."""
    inputs, h0 = make_inputs(B=1, T=20, H=2, Hkv=1, K=8, V=8, M=16)
    q, k, v, s, g = (x.detach() for x in inputs)
    _, h = gsa_chunk(q, k, v, torch.zeros_like(s), torch.zeros_like(g), 1.0, h0, True)
    assert torch.equal(h[0], h0[0]) and torch.equal(h[1], h0[1])


def test_bad_shapes_are_rejected():
    (q, k, v, s, g), _ = make_inputs(B=1, T=4, H=3, Hkv=2, K=8, V=8, M=4, state=False)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        gsa_chunk(q, k, v, s, g)


def test_decode_reference_updates_the_state_in_place_like_the_recurrence():
    from t2r.kernels.reference import gsa_decode_reference

    (q, k, v, s, g), h0 = make_inputs(2, 3, 4, 2, 8, 8, 16)
    state = tuple(x.detach().clone() for x in h0)
    with torch.no_grad():
        o = gsa_decode_reference(q, k, v, s, g, 0.5, state)
        o_ref, (hk, hv) = gsa_recurrent(q, k, v, s, g, 0.5, h0, True)
    assert rel_err(o, o_ref) == 0 and rel_err(state[0], hk) == 0 and rel_err(state[1], hv) == 0
