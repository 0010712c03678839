"""Sliding-window softmax attention for the hybrid GSA layers, with a fixed-size decoding window.

Training/prefill processes queries in blocks, each against only the keys its window can reach, so memory is
O(T x (block + window)), not O(T^2). Decoding keeps the last ``window`` keys/values (and which of them are real
tokens) per layer in a ring (:data:`t2r.kernels.reference.Window`): constant memory, whatever the context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2r.kernels.reference import Window, window_in_order, window_ring


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    valid: torch.Tensor | None = None,
    doc: torch.Tensor | None = None,
    past: Window | None = None,
    block: int = 1024,
    sink: tuple[torch.Tensor, torch.Tensor] | None = None,
    masks: dict | None = None,
    carry: bool = False,
) -> tuple[torch.Tensor, Window | None]:
    """Causal softmax attention of each token over itself and the previous ``window - 1`` tokens.

    q [B, T, H, D]; k, v [B, T, Hkv, D]; ``valid`` [B, T] marks real (non-padding) tokens; ``doc`` [B, T]
    numbers packed documents (attention never crosses them); ``past`` is the ring carried from earlier calls
    (its tokens continue each row's first document); ``sink`` (key, value [Hkv, D]) is a virtual token every query
    also sees. ``masks``: where the block masks of a forward's layers are kept (the model passes one
    per forward: its layers share positions, padding and documents), so the first layer builds them, about ten
    launches per block, and the others reuse them; not used with a carried window or under torch.compile.
    Returns the output and, with ``carry`` (a forward with a cache), the new ring (the sink in its slot 0).
    """
    B, T, H, _ = q.shape
    Hkv = k.shape[2]
    device = q.device
    valid = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid.bool()
    if past is not None:
        past_k, past_v, past_valid = window_in_order(past)
        k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        valid_all = torch.cat([past_valid, valid], dim=1)
    else:
        k_all, v_all, valid_all = k, v, valid
    P = k_all.shape[1] - T
    doc_all = None
    if doc is not None:
        doc_all = torch.cat([doc[:, :1].expand(B, P), doc], dim=1) if P else doc
    if masks is not None and (past is not None or torch.compiler.is_compiling()):
        masks = None
    if sink is not None:
        sink_k, sink_v = (x.to(y.dtype).expand(B, 1, Hkv, -1) for x, y in zip(sink, (k, v), strict=True))
    outs = []
    for s in range(0, T, block):
        e = min(T, s + block)
        lo, hi = max(0, P + s - window + 1), P + e
        key = (s, e, window, sink is not None)
        mask = masks.get(key) if masks is not None else None
        if mask is None:
            mask = _block_mask(P, s, e, lo, hi, window, valid_all, doc_all, doc, sink is not None)
            if masks is not None:
                masks[key] = mask
        k_blk, v_blk = k_all[:, lo:hi], v_all[:, lo:hi]
        if sink is not None:
            k_blk, v_blk = torch.cat([sink_k, k_blk], dim=1), torch.cat([sink_v, v_blk], dim=1)
        o = F.scaled_dot_product_attention(
            q[:, s:e].transpose(1, 2),
            k_blk.transpose(1, 2),
            v_blk.transpose(1, 2),
            attn_mask=mask[:, None],
            scale=scale,
            enable_gqa=Hkv != H,
        )
        outs.append(o.transpose(1, 2))
    ring = window_ring(k_all.detach(), v_all.detach(), valid_all, window, sink) if carry else None
    return torch.cat(outs, dim=1), ring


def _block_mask(P, s, e, lo, hi, window, valid_all, doc_all, doc, sink: bool) -> torch.Tensor:
    """[B, e - s, (sink) + hi - lo] which keys queries s..e of a block see: their window, real tokens of their own
    document, and themselves (padding queries too: finite, and ignored)."""
    device = valid_all.device
    qpos = torch.arange(P + s, P + e, device=device)[:, None]
    kpos = torch.arange(lo, hi, device=device)[None, :]
    mask = ((kpos <= qpos) & (kpos > qpos - window))[None] & valid_all[:, None, lo:hi]
    if doc_all is not None:
        mask = mask & (doc_all[:, None, lo:hi] == doc[:, s:e, None])
    mask = mask | (kpos == qpos)[None]
    return F.pad(mask, (1, 0), value=True) if sink else mask
