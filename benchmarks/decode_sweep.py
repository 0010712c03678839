"""Block size and warps of the fused decode step on the GPU (T2R_GSA_DECODE_BLOCK: rows / columns the memories
stream through per step, 0 = the all-at-once kernel; T2R_GSA_DECODE_WARPS). Checks every setting against the
default on the same inputs before timing; prints ms per step and its ratio to the state floor and to a plain
copy of the state's bytes. With ``--batch`` (repeatable) it instead times the default setting at each batch size,
which shows how much of the gap to the floor is a fixed per-step cost rather than bandwidth.
(A two-launch variant, keys then the value memory's columns split over more programs, measured no faster on the
H100 and was removed; docs/bench/decode_sweep_2026-11-23_h100.json holds that sweep.)

python benchmarks/decode_sweep.py [--batch B ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from t2r.bench.kernels import _bench, copy_bandwidth, decode_inputs, rel_err, state_copy_ms, state_floor_ms
from t2r.kernels.decode import gsa_decode_triton
from t2r.kernels.tuning import TUNING


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--batch", type=int, action="append", help="time the default setting at this batch size")
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = batch_rows(args.batch, bw) if args.batch else setting_rows(bw)
    best = min(rows, key=lambda r: r["ms"] / r["floor_ms"])
    print("best:", best)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth_Bps": bw, "rows": rows}, f, indent=1)


def _row(ms: float, floor: float, copy_ms: float, **extra) -> dict:
    row = {**extra, "ms": round(ms, 4), "floor_ms": round(floor, 4), "ratio": round(ms / floor, 3),
           "state_copy_ms": round(copy_ms, 4), "ratio_copy": round(ms / copy_ms, 3)}  # fmt: skip
    print(row, flush=True)
    return row


def batch_rows(batches: list[int], bw: float, H: int = 32, K: int = 128, V: int = 128, M: int = 64) -> list[dict]:
    rows = []
    for B in batches:
        (q, k, v, s, g), state = decode_inputs(B, H, K, V, M, torch.bfloat16)
        ms = _bench(lambda q=q, k=k, v=v, s=s, g=g, st=state: gsa_decode_triton(q, k, v, s, g, None, st))
        rows.append(_row(ms, state_floor_ms(state, bw), state_copy_ms(state), B=B))
    return rows


def setting_rows(bw: float, B: int = 16, H: int = 32, K: int = 128, V: int = 128, M: int = 64) -> list[dict]:
    (q, k, v, s, g), state = decode_inputs(B, H, K, V, M, torch.bfloat16)
    floor = state_floor_ms(state, bw)
    copy_ms = state_copy_ms(state)
    default = TUNING.decode_block, TUNING.decode_warps
    ref = [x.clone() for x in state]
    o_ref = gsa_decode_triton(q, k, v, s, g, None, ref)
    rows = []
    for block in (0, 16, 32, 64):
        for warps in (2, 4, 8):
            TUNING.decode_block, TUNING.decode_warps = block, warps
            st = [x.clone() for x in state]
            o = gsa_decode_triton(q, k, v, s, g, None, st)
            pairs = zip([o, *st], [o_ref, *ref], strict=True)
            err = max(rel_err(a, b) for a, b in pairs)
            ms = _bench(lambda st=st: gsa_decode_triton(q, k, v, s, g, None, st))
            rows.append(_row(ms, floor, copy_ms, block=block, warps=warps, rel_err_vs_default=err))
    TUNING.decode_block, TUNING.decode_warps = default
    return rows


if __name__ == "__main__":
    main()
