"""Per-kernel CUDA time of one GSA forward + backward (torch.profiler), at the kernels issue's shapes.

Usage: python benchmarks/profile_kernels.py [BxT ...]   (default 8x2048 1x16384; H=32, K=V=128, M=64, bf16)
"""

from __future__ import annotations

import sys

import torch
from t2r.kernels import gsa_triton as kernels
from torch.profiler import ProfilerActivity, profile

from t2r.bench_kernels import _inputs

# The Triton kernels of one forward + backward, in launch order (_state_fwd_kernel: twice in each pass).
KERNELS = [
    "_state_fwd_kernel",
    "_logits_fwd_kernel",
    "_out_v_fwd_kernel",
    "_dz_sweep_kernel",
    "_dq_sweep_kernel",
    "_state_bwd_kernel",
    "_rev_k_kernel",
    "_rev_v_kernel",
    "_rev_cumsum_kernel",
]
assert all(hasattr(kernels, name) for name in KERNELS), "KERNELS names a kernel gsa_triton no longer has"


def main() -> None:
    shapes = [tuple(int(x) for x in a.split("x")) for a in sys.argv[1:]] or [(8, 2048), (1, 16384)]
    for B, T in shapes:
        q, k, v, s, g = inputs = _inputs(B, T, 32, 128, 128, 64, torch.bfloat16)
        do = torch.randn_like(q)
        for _ in range(3):  # compile and warm up
            kernels.gsa_triton(q, k, v, s, g)[0].backward(do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for x in inputs:
                    x.grad = None
                kernels.gsa_triton(q, k, v, s, g)[0].backward(do)
            torch.cuda.synchronize()
        print(f"== B={B} T={T}: CUDA time per forward+backward, by kernel")
        events = {e.key: e for e in prof.key_averages()}
        total = 0.0
        for name in KERNELS:
            e = events.pop(name, None)
            if e is None:
                print(f"{name:60s} (not in the profile)")
                continue
            total += e.device_time_total / 5 / 1000
            print(f"{name:60s} {e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5}")
        print(f"{'(GSA kernels together)':60s} {total:8.3f} ms")
        others = sorted((e for e in events.values() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
        for e in others[:6]:
            print(f"{e.key[:60]:60s} {e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5}")


if __name__ == "__main__":
    main()
