"""Per-kernel CUDA time of one GSA forward + backward (torch.profiler), at the kernels issue's shapes.

Usage: python benchmarks/profile_kernels.py [BxT ...]   (default 8x2048 1x16384; H=32, K=V=128, M=64, bf16)
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from t2r.bench.kernels import _inputs
from t2r.kernels.chunk import gsa_chunk_triton


def main() -> None:
    shapes = [tuple(int(x) for x in a.split("x")) for a in sys.argv[1:]] or [(8, 2048), (1, 16384)]
    for B, T in shapes:
        q, k, v, s, g = inputs = _inputs(B, T, 32, 128, 128, 64, torch.bfloat16)
        do = torch.randn_like(q)
        for _ in range(3):  # compile and warm up
            gsa_chunk_triton(q, k, v, s, g)[0].backward(do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for x in inputs:
                    x.grad = None
                gsa_chunk_triton(q, k, v, s, g)[0].backward(do)
            torch.cuda.synchronize()
        print(f"== B={B} T={T}: CUDA time per forward+backward, by kernel")
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        for e in rows[:14]:
            print(f"{e.key[:60]:60s} {e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5}")


if __name__ == "__main__":
    main()
