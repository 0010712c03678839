"""The hybrid's fused window step (t2r/kernels/window.py) per launch geometry: slots per tile, warps, slot parts per
(row, KV head), at SmolLM2's and Mistral-7B's shapes with a ring of 1 + 512 slots. Each configuration is checked
against the PyTorch reference (relative error) and timed as 30 steps in one CUDA graph (no host time), next to the
floor of reading the ring once at the device's copy bandwidth. Needs a GPU.

Usage: python benchmarks/gpu/window_tiles.py [--json out.json]"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from sweeps import graphed_ms, rel_err, report

from t2r.bench.kernels import copy_bandwidth
from t2r.kernels import window as window_module
from t2r.kernels.reference import window_decode_reference
from t2r.kernels.window import window_decode_triton

SHAPES = {"smollm2-135m": (9, 3, 64, 576), "mistral-7b": (32, 8, 128, 4096)}  # heads, KV heads, head dim, hidden


def inputs(B: int, H: int, Hkv: int, D: int, C: int, W: int, dtype=torch.bfloat16):
    """q, k, v, the ring, GSA's output, and the per-token mix's terms (per-head logits, router weight, hidden)."""
    dev = "cuda"
    ring = [torch.randn(B, W + 1, Hkv, D, device=dev, dtype=dtype) for _ in range(2)]
    valid = torch.ones(B, W + 1, dtype=torch.bool, device=dev)
    head = torch.randint(1, W + 1, (B,), device=dev)
    q = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
    k, v = (torch.randn(B, 1, Hkv, D, device=dev, dtype=dtype) for _ in range(2))
    o = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
    mix = (torch.randn(H, device=dev, dtype=dtype), torch.randn(H, C, device=dev, dtype=dtype) / C**0.5,
           torch.randn(B, 1, C, device=dev, dtype=dtype))  # fmt: skip
    return q, k, v, (*ring, valid, head), o, mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    parts_of = window_module.window_parts
    rows = []
    for (shape, (H, Hkv, D, C)), B in itertools.product(SHAPES.items(), (1, 16, 64)):
        q, k, v, past, o, mix = inputs(B, H, Hkv, D, C, args.window)
        ring_bytes = sum(x.numel() * x.element_size() for x in past[:3])
        floor_ms = ring_bytes / bandwidth * 1e3
        reference = window_decode_reference(q, k, v, tuple(x.clone() for x in past), None, D**-0.5, o, *mix)
        timed = tuple(x.clone() for x in past)  # each step writes its ring: timings must not touch the checks' input
        try:
            ref_ms = graphed_ms(lambda: window_decode_reference(q, k, v, timed, None, D**-0.5, o, *mix))  # noqa: B023
        except RuntimeError:  # the reference's mask may not capture; its time is then left out
            ref_ms = float("nan")
        for block, warps, spread in itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 4)):
            window_module.WINDOW_BLOCK, window_module.WINDOW_WARPS = block, warps
            window_module.window_parts = lambda rows, slots, sms, blk, s=spread: parts_of(rows, slots, s * sms, blk)
            check = tuple(x.clone() for x in past)
            err = rel_err(window_decode_triton(q, k, v, check, None, D**-0.5, o, *mix), reference)
            ms = graphed_ms(lambda: window_decode_triton(q, k, v, timed, None, D**-0.5, o, *mix))  # noqa: B023
            rows.append({"shape": shape, "batch": B, "block": block, "warps": warps, "programs_per_sm": 2 * spread,
                         "ms": round(ms, 5), "rel_err": err, "floor_ms": round(floor_ms, 5),
                         "x_floor": round(ms / floor_ms, 2), "torch_ms": round(ref_ms, 5)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    window_module.window_parts = parts_of
    report(rows, ("shape", "batch"), args.json)


if __name__ == "__main__":
    main()
