"""Pure-PyTorch Gated Slot Attention: the oracle every fast path is tested against.

Layout (FLA's "b t h d"): q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; s, g [B, T, Hkv, M] with
g = log(alpha) <= 0 the per-slot log forget gate and s the write weight (1 - alpha for GSA). Query head h
reads the memories of KV head h // (H // Hkv) (the order of transformers' ``repeat_kv``).

The memories depend only on k, v, s, g, so they are kept per KV head, not per query head:
state = (hk [N, Hkv, K, M], hv [N, Hkv, M, V]), always fp32, N = batch or number of packed sequences.

    hk_t = hk_{t-1} * alpha_t + k_t s_t^T        hv_t = alpha_t * hv_{t-1} + s_t v_t^T
    o_t  = hv_t^T softmax_M(scale * hk_t^T q_t)

``gsa_recurrent`` and ``gsa_chunk`` take and return the same things (``gsa_chunk`` is the chunkwise-parallel
form: the reference of the Triton chunk kernels); ``gsa_decode_reference`` is the in-place decode step's, and
``gsa_decode_fused_reference`` that of the step that also applies the layer's input maps
(``gsa_prologue_reference``) and the output's silu.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

State = tuple[torch.Tensor, torch.Tensor]

FEATURE_MAPS = {"swish": F.silu, "relu": F.relu, "identity": lambda x: x}  # q/k feature maps by config name


def log_forget_gate(f: torch.Tensor, normalizer: float) -> torch.Tensor:
    """log alpha (fp32) from the slot-gate logits f = f_proj(x)."""
    return F.logsigmoid(f.float()) / normalizer


def gsa_prologue_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, feature_map: str, normalizer: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """GSA's inputs (q, k, v, s, g) from a layer's projections: the q/k feature map, silu values, the log forget
    gates and write weights 1 - alpha (fp32). Tokens whose ``keep`` [B, T] is 0 (padding) neither write nor decay
    the memories."""
    g = log_forget_gate(f, normalizer)
    s = -torch.expm1(g)
    if keep is not None:
        keep = keep.to(g.dtype)[..., None, None]
        g, s = g * keep, s * keep
    fm = FEATURE_MAPS[feature_map]
    return fm(q), fm(k), F.silu(v), s, g


def check_inputs(q, k, v, s, g, initial_state, cu_seqlens) -> tuple[int, int]:
    B, T, H, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or s.shape != g.shape or s.shape[:2] != (B, T):
        raise ValueError(
            f"inconsistent shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
            f"s{tuple(s.shape)} g{tuple(g.shape)}"
        )
    Hkv = k.shape[2]
    if H % Hkv or v.shape[2] != Hkv or s.shape[2] != Hkv or k.shape[3] != K:
        raise ValueError(f"query heads {H} must be a multiple of KV heads {Hkv} shared by k, v, s, g")
    if cu_seqlens is not None and B != 1:
        raise ValueError("cu_seqlens needs a packed batch of size 1")
    n = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None:
        hk, hv = initial_state
        M, V = s.shape[3], v.shape[3]
        if hk.shape != (n, Hkv, K, M) or hv.shape != (n, Hkv, M, V):
            raise ValueError(
                f"initial_state shapes {tuple(hk.shape)}, {tuple(hv.shape)} != {(n, Hkv, K, M)}, {(n, Hkv, M, V)}"
            )
    return H // Hkv, n


def _zero_state(n: int, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> State:
    Hkv, K, M, V = k.shape[2], k.shape[3], s.shape[3], v.shape[3]
    return (k.new_zeros(n, Hkv, K, M, dtype=torch.float32), k.new_zeros(n, Hkv, M, V, dtype=torch.float32))


def _recurrent_one(q, k, v, s, g, scale: float, state: State) -> tuple[torch.Tensor, State]:
    """Token-by-token over one batch (no packing); all math in fp32."""
    B, T, H, _ = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    hk, hv = state
    outs = []
    for t in range(T):
        a = g[:, t].exp()  # [B, Hkv, M]
        st = s[:, t]
        hk = hk * a[:, :, None, :] + k[:, t, :, :, None] * st[:, :, None, :]
        hv = hv * a[..., None] + st[..., None] * v[:, t, :, None, :]
        qt = q[:, t].reshape(B, Hkv, G, -1)
        p = torch.softmax(scale * torch.einsum("bhgk,bhkm->bhgm", qt, hk), dim=-1)
        outs.append(torch.einsum("bhgm,bhmv->bhgv", p, hv).reshape(B, H, -1))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, hv.shape[-1])  # empty packed sequences
    return o, (hk, hv)


def gsa_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """GSA one token at a time, exactly as written in the module docstring (the oracle)."""
    _, n = check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, s, g = (x.float() for x in (q, k, v, s, g))
    state = initial_state if initial_state is not None else _zero_state(n, k, v, s)
    state = (state[0].float(), state[1].float())
    if cu_seqlens is None:
        o, final = _recurrent_one(q, k, v, s, g, scale, state)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            o_i, f_i = _recurrent_one(
                *(x[:, lo:hi] for x in (q, k, v, s, g)), scale, (state[0][i : i + 1], state[1][i : i + 1])
            )
            outs.append(o_i)
            finals.append(f_i)
        o = torch.cat(outs, dim=1)
        final = (torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]))
    return o.to(dtype), (final if output_final_state else None)


_MAX_CHUNK_DECAY = 60.0  # nats of decay allowed inside one chunk: factors stay below exp(30)


def _chunk_core(q, k, v, s, g, scale: float, state: State, chunk: int) -> tuple[torch.Tensor, State]:
    """Chunkwise GSA on an unpacked fp32 batch whose length is a multiple of ``chunk``.

    Within a chunk, b = cumsum(g) and every decay is exp(b_t - b_j) = exp(b_t - r) * exp(r - b_j) with
    r = b_last / 2, which turns the intra-chunk terms into plain matmuls. Each factor is at most
    exp(|b_last| / 2); the caller picks ``chunk`` so that this stays far from fp32 overflow.
    Chunk-boundary states come from a short sequential scan.
    """
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    G, N, C = H // Hkv, T // chunk, chunk

    def split(x):  # [B, T, Hkv, D] -> [B, Hkv, N, C, D]
        return x.reshape(B, N, C, Hkv, -1).permute(0, 3, 1, 2, 4)

    k, v, s, g = split(k), split(v), split(s), split(g)
    q = q.reshape(B, N, C, Hkv, G, K).permute(0, 3, 4, 1, 2, 5)  # [B, Hkv, G, N, C, K]
    b = g.cumsum(dim=-2)  # [B, Hkv, N, C, M]
    b_last = b[..., -1:, :]  # [B, Hkv, N, 1, M]

    # Chunk-local contributions to the boundary states, then the scan over chunks.
    w_end = (b_last - b).exp() * s
    dhk = torch.einsum("bhnck,bhncm->bhnkm", k, w_end)
    dhv = torch.einsum("bhncm,bhncv->bhnmv", w_end, v)
    decay = b_last.squeeze(-2).exp()  # [B, Hkv, N, M]
    hk, hv = state
    hk_starts, hv_starts = [], []
    for n in range(N):
        hk_starts.append(hk)
        hv_starts.append(hv)
        hk = hk * decay[:, :, n, None, :] + dhk[:, :, n]
        hv = hv * decay[:, :, n, :, None] + dhv[:, :, n]
    hk0 = torch.stack(hk_starts, dim=2).unsqueeze(2)  # [B, Hkv, 1, N, K, M]
    hv0 = torch.stack(hv_starts, dim=2).unsqueeze(2)  # [B, Hkv, 1, N, M, V]

    # The clamp never binds when the chunk rule holds; for chunk = 1 it keeps exp(b - r) * exp(r - b) = 1.
    r, lim = b_last / 2, _MAX_CHUNK_DECAY / 2
    e_q = (b - r).clamp(-lim, lim).exp().unsqueeze(2)  # query-side factor [B, Hkv, 1, N, C, M]
    s_k = ((r - b).clamp(-lim, lim).exp() * s).unsqueeze(2)  # key-side factor times the write weight
    eb = b.exp().unsqueeze(2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    k, v = k.unsqueeze(2), v.unsqueeze(2)

    # Pass 1: slot logits, softmax over slots.
    A = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    logits = (q @ hk0) * eb + (A @ s_k) * e_q
    p = torch.softmax(scale * logits, dim=-1)
    # Pass 2: read the value memory with the slot weights.
    A2 = ((p * e_q) @ s_k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    o = (p * eb) @ hv0 + A2 @ v
    return o.permute(0, 3, 4, 1, 2, 5).reshape(B, T, H, V), (hk, hv)


def _safe_chunk(g: torch.Tensor, chunk_size: int) -> int:
    """Largest power-of-two chunk (<= chunk_size) whose worst-case in-chunk decay stays bounded."""
    worst = float(-g.detach().min()) if g.numel() else 0.0
    chunk = chunk_size
    while chunk > 1 and chunk * worst > _MAX_CHUNK_DECAY:
        chunk //= 2
    return chunk


def _pad_time(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, 0, 0, length - x.shape[1]))


def gsa_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State | None]:
    """Chunkwise-parallel GSA, same contract as :func:`gsa_recurrent`.

    Padding appended to reach a chunk multiple has s = 0 (no write) and g = 0 (no decay), so it leaves the
    state untouched; packed sequences are unpacked into a right-padded batch, which resets state per document.
    """
    _, n = check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, s, g = (x.float() for x in (q, k, v, s, g))
    state = initial_state if initial_state is not None else _zero_state(n, k, v, s)
    state = (state[0].float(), state[1].float())
    chunk_size = _safe_chunk(g, chunk_size)
    if cu_seqlens is None:
        T = q.shape[1]
        Tp = -(-T // chunk_size) * chunk_size
        o, final = _chunk_core(*(_pad_time(x, Tp) for x in (q, k, v, s, g)), scale, state, chunk_size)
        o = o[:, :T]
    else:
        bounds = cu_seqlens.tolist()
        lengths = [hi - lo for lo, hi in itertools.pairwise(bounds)]
        Tp = max(-(-max(lengths) // chunk_size) * chunk_size, chunk_size)
        padded = [
            torch.cat([_pad_time(x[:, lo:hi], Tp) for lo, hi in itertools.pairwise(bounds)]) for x in (q, k, v, s, g)
        ]
        o_pad, final = _chunk_core(*padded, scale, state, chunk_size)
        o = torch.cat([o_pad[i : i + 1, :length] for i, length in enumerate(lengths)], dim=1)
    return o.to(dtype), (final if output_final_state else None)


def gsa_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, scale: float | None,
    state: State,
) -> torch.Tensor:  # fmt: skip
    """A few new tokens on top of ``state``, which is updated in place; returns o (the decode kernel's contract)."""
    o, (hk, hv) = gsa_recurrent(q, k, v, s, g, scale, state, True)
    state[0].copy_(hk)
    state[1].copy_(hv)
    return o


def gsa_decode_fused_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, scale: float | None, state: State,
    feature_map: str, normalizer: float, keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A few new tokens from the layer's projections (:func:`gsa_prologue_reference`) on top of ``state``, updated in
    place; returns silu(o), the input of the layer's output norm (the fused decode kernel's contract)."""
    inputs = gsa_prologue_reference(q, k, v, f, feature_map, normalizer, keep)
    return F.silu(gsa_decode_reference(*inputs, scale, state))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-family RMSNorm (the fused kernel's contract): fp32 statistics, the normalised row in the
    input's dtype, times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def grouped_linear_reference(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...], *,
    norm: tuple[torch.Tensor, float] | None = None, glu: bool = False, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Each linear map (weight [N_i, K], bias [N_i] or None) applied to ``x`` [..., K]: the grouped projection's
    contract. ``norm`` (weight, eps): to the RMS-normalised ``x``; ``glu``: of two maps (an MLP's gate and up),
    only silu(gate) * up; ``residual``: added to the one map's output."""
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    out = tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
    if glu:
        out = (swiglu_reference(*out),)
    return out if residual is None else (residual + out[0], *out[1:])


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A Llama-family MLP's activation, as transformers computes it: silu(gate) * up."""
    return F.silu(gate) * up


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary embedding (``apply_rotary_pos_emb`` with ``unsqueeze_dim=2``) of q [B, T, H, D] and
    k [B, T, Hkv, D] by cos / sin [B or 1, T, D]: x * cos + rotate_half(x) * sin."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# A hybrid layer's decoding window, kept as a ring: keys [B, 1 + W, Hkv, D], values, valid [B, 1 + W] (real
# tokens) and head [B] (int64: the slot the next token overwrites, its row's oldest, in 1..W). Slot 0 holds the
# sink, valid where the layer has one; slots 1..W the last W tokens in ring order. Softmax attention does not care
# about the order, so a decoding step writes one slot where a window in order would move all W.
Window = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def window_ring(
    k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, window: int,
    sink: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Window:  # fmt: skip
    """The ring (:data:`Window`) of the last ``window`` of the tokens k / v [B, T, Hkv, D] (``valid`` [B, T]), oldest
    first (head 1); rows with fewer tokens start with invalid slots. ``sink``: (key, value [Hkv, D]) for slot 0."""
    B, T, Hkv, D = k.shape
    n = min(T, window)
    ring_k, ring_v = k.new_zeros(B, 1 + window, Hkv, D), v.new_zeros(B, 1 + window, Hkv, v.shape[-1])
    ring_valid = torch.zeros(B, 1 + window, dtype=torch.bool, device=k.device)
    if n:
        ring_k[:, 1 + window - n :] = k[:, T - n :]
        ring_v[:, 1 + window - n :] = v[:, T - n :]
        ring_valid[:, 1 + window - n :] = valid[:, T - n :]
    if sink is not None:
        ring_k[:, 0], ring_v[:, 0] = sink[0].to(k.dtype), sink[1].to(v.dtype)
        ring_valid[:, 0] = True
    return ring_k, ring_v, ring_valid, torch.ones(B, dtype=torch.long, device=k.device)


def window_in_order(window: Window) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ring's W tokens in order, oldest first: keys [B, W, Hkv, D], values, valid [B, W] (the sink left out)."""
    ring_k, ring_v, ring_valid, head = window
    W = ring_k.shape[1] - 1
    at = 1 + (head[:, None] - 1 + torch.arange(W, device=head.device)) % W  # [B, W]
    take = at[:, :, None, None]
    return (
        ring_k.gather(1, take.expand(-1, -1, *ring_k.shape[2:])),
        ring_v.gather(1, take.expand(-1, -1, *ring_v.shape[2:])),
        ring_valid.gather(1, at),
    )


def window_step_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, valid: torch.Tensor, past: Window
) -> torch.Tensor:
    """One new token per row (q [B, 1, H, D], k / v [B, 1, Hkv, D], ``valid`` [B, 1]) of a hybrid layer's sliding
    window, the ring ``past`` updated in place: the token overwrites its row's oldest slot (``window`` tokens back,
    so out of its reach), then attends over the ring's valid slots (the sink's included) and itself (a padding
    query too, so that it stays finite). Returns the attention's output."""
    B, _, H, _ = q.shape
    Hkv = k.shape[2]
    ring_k, ring_v, ring_valid, head = past
    W = ring_k.shape[1] - 1
    ring_k.scatter_(1, head.view(B, 1, 1, 1).expand(B, 1, Hkv, ring_k.shape[-1]), k.to(ring_k.dtype))
    ring_v.scatter_(1, head.view(B, 1, 1, 1).expand(B, 1, Hkv, ring_v.shape[-1]), v.to(ring_v.dtype))
    ring_valid.scatter_(1, head[:, None], valid.bool())
    seen = ring_valid.scatter(1, head[:, None], True)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        ring_k.transpose(1, 2),
        ring_v.transpose(1, 2),
        attn_mask=seen[:, None, None],
        scale=scale,
        enable_gqa=Hkv != H,
    )
    head.copy_(head % W + 1)
    return o.transpose(1, 2)


def mix_window(o: torch.Tensor, o_win: torch.Tensor, mix_logits: torch.Tensor) -> torch.Tensor:
    """A hybrid layer's output per head [B, T, H, D]: sigmoid(mix) of the window's, the rest GSA's. ``mix_logits``
    is [H] (per head) or [B, T, H] (per token)."""
    mix = torch.sigmoid(mix_logits)[..., None].to(o.dtype)
    return torch.lerp(o, o_win.to(o.dtype), mix)


def window_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Window, keep: torch.Tensor | None, scale: float,
    o: torch.Tensor, mix_logits: torch.Tensor, mix_proj: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A hybrid layer's decoding step past its GSA output ``o`` [B, 1, H, D]: the window's attention
    (:func:`window_step_attention`, which updates the ring ``past`` in place; ``keep`` [B, 1] marks real tokens)
    and its mix with ``o`` (the fused window kernel's contract). The mix's logits are ``mix_logits`` ([H] or
    [B, 1, H]) plus, with ``mix_proj`` [H, C], the linear read of ``hidden`` [B, 1, C] (:class:`WindowMix`'s)."""
    valid = torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device) if keep is None else keep.bool()
    logits = mix_logits.float()
    if mix_proj is not None:
        logits = logits + F.linear(hidden, mix_proj).float()
    return mix_window(o, window_step_attention(q, k, v, scale, valid, past), logits)


def cross_entropy_sum_reference(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Sum over rows of the cross-entropy of ``logits`` [..., V] against ``labels`` [...], each row's loss times
    its weight (``weights`` [...], optional); rows labelled ``ignore_index`` count 0. In fp32."""
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index,
                          reduction="none")  # fmt: skip
    return per.sum() if weights is None else (per * weights.reshape(-1)).sum()


def kd_sum_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)) times T^2, the usual distillation scale;
    each row's value times its weight (``weights`` [...], optional), rows labelled ``ignore_index`` count 0. In
    fp32."""
    V = student.shape[-1]
    log_p_s = F.log_softmax(student.reshape(-1, V).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.reshape(-1, V).float() / temperature, dim=-1)
    p_t = log_p_t.exp()
    # p log p -> 0 where the teacher gives a token no mass (F.kl_div makes that 0 * -inf = NaN)
    per = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(-1)
    per = torch.where(labels.reshape(-1) != ignore_index, per, 0.0)
    return (per if weights is None else per * weights.reshape(-1)).sum() * temperature**2
