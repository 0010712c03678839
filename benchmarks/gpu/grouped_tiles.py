"""The grouped projection (t2r/kernels/grouped_linear.py) against one cuBLAS GEMM per weight, per launch geometry
(output columns per program, inner block, warps), at SmolLM2-135M's and Mistral-7B's decoding projections (a GSA
layer's q/k/v/gates, an MLP's gate/up) for 1, 16 and 64 rows. Each configuration is checked against F.linear
(relative error) and both are timed from one CUDA graph (no host time) over copies of the weights that together
outgrow L2 (t2r.bench.kernels.graphed_ms), as a model's layers read theirs from HBM one after another, beside the
floor of reading the weights once. (Until 2026-12-06 one weight set was timed over and over, warm in L2: 3.0 us a
launch at SmolLM2's q/k/v/gates on an H100, where the model's step spent 4.8 us on an H200.) Needs a GPU.

Usage: python benchmarks/gpu/grouped_tiles.py [--json out.json]"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from sweeps import rel_err, report

from t2r.bench.kernels import copies, copy_bandwidth, graphed_ms
from t2r.kernels import grouped_linear as grouped_module
from t2r.kernels.grouped_linear import grouped_linear_triton
from t2r.kernels.reference import grouped_linear_reference

# (hidden size, output sizes) of each grouped call
SHAPES = {
    "smollm2-135m attention": (576, (576, 192, 192, 192)),
    "smollm2-135m mlp": (576, (1536, 1536)),
    "mistral-7b attention": (4096, (4096, 1024, 1024, 512)),
    "mistral-7b mlp": (4096, (14336, 14336)),
    # the one-weight maps: a GSA layer's output projection, an MLP's down projection
    "smollm2-135m o_proj": (576, (576,)),
    "smollm2-135m down_proj": (1536, (576,)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    rows_out = []
    for (shape, (K, sizes)), M in itertools.product(SHAPES.items(), (1, 16, 64)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        nbytes = K * sum(sizes) * 2
        sets = [tuple(torch.randn(n, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for n in sizes)
                for _ in range(copies(nbytes, most=512))]  # fmt: skip
        weights, biases = sets[0], (None,) * len(sizes)
        want = grouped_linear_reference(x, weights, biases)
        floor_ms = nbytes / bandwidth * 1e3
        cublas_ms = graphed_ms([lambda w=w: grouped_linear_reference(x, w, biases) for w in sets])  # noqa: B023
        for bn, bk, warps in itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8)):
            grouped_module.GROUPED_GEOMETRY = (bn, bk, warps)
            got = grouped_linear_triton(x, weights, biases)
            err = max(rel_err(a, b) for a, b in zip(got, want, strict=True))
            ms = graphed_ms([lambda w=w: grouped_linear_triton(x, w, biases) for w in sets])  # noqa: B023
            rows_out.append({"shape": shape, "rows": M, "BN": bn, "BK": bk, "warps": warps, "ms": round(ms, 5),
                             "cublas_ms": round(cublas_ms, 5), "speedup": round(cublas_ms / ms, 2), "rel_err": err,
                             "floor_ms": round(floor_ms, 5)})  # fmt: skip
            print(json.dumps(rows_out[-1]), flush=True)
        grouped_module.GROUPED_GEOMETRY = None  # the per-call choice (grouped_linear.geometry) beside the sweep
        bn, bk, warps = grouped_module.geometry(sum(sizes), M, x.device)
        ms = graphed_ms([lambda w=w: grouped_linear_triton(x, w, biases) for w in sets])  # noqa: B023
        print(f"auto shape={shape} rows={M}: BN {bn} BK {bk} warps {warps} {ms:.5f} ms", flush=True)
    report(rows_out, ("shape", "rows"), args.json)


if __name__ == "__main__":
    main()
