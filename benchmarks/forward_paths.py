"""The forward output's two paths in one process: the sub-chunk walk (``_out_fwd_kernel``) against the
segment-at-once kernels (``_slot_probs_kernel`` + ``_out_blocks_kernel``) at 4 / 8 warps and 1 / 2 pipeline
stages, each twice; forward times (bf16, H = 32, K = V = 128, M = 64) with each output's difference to the
walk's, and a per-kernel CUDA profile at 8 x 2k and 1 x 16k.

Usage (GPU): python benchmarks/forward_paths.py"""

# ruff: noqa: B023  (timing closures are built and called within one loop iteration)
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import t2r.kernels  # noqa: F401
from t2r.bench.kernels import _inputs
from t2r.kernels import chunk as kernels
from t2r.kernels.tuning import TUNING

VARIANTS = [("walk", None)] + [(f"blocks w{w} st{st}", (w, st)) for w, st in [(4, 2), (8, 2), (8, 1), (4, 1)]] * 2


def use(variant: tuple[int, int] | None) -> None:
    TUNING.fwd_blocks = variant is not None
    TUNING.fwd_warps, TUNING.stages = variant if variant is not None else (4, 2)


def main() -> None:
    for B, T in [(8, 2048), (2, 8192), (1, 16384), (1, 32768)]:
        with torch.no_grad():
            inputs = _inputs(B, T, 32, 128, 128, 64, torch.bfloat16, requires_grad=False)
            use(None)
            ref = kernels.gsa_chunk_triton(*inputs)[0].float()
            print(f"{B}x{T}:", flush=True)
            for name, variant in VARIANTS:
                use(variant)
                o = kernels.gsa_chunk_triton(*inputs)[0].float()
                err = ((o - ref).norm() / ref.norm()).item()
                ms = do_bench(lambda: kernels.gsa_chunk_triton(*inputs), warmup=10, rep=100)
                print(f"  {name:16s} fwd {ms:.3f} ms  rel diff to walk {err:.1e}", flush=True)
            if T not in (2048, 16384):
                continue
            for name, variant in (("walk", None), ("blocks w4 st2", (4, 2)), ("blocks w8 st2", (8, 2))):
                use(variant)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        kernels.gsa_chunk_triton(*inputs)
                    torch.cuda.synchronize()
                top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:5]
                print(f"  profile {name}: " + ", ".join(f"{e.key[:22]} {e.device_time_total / 5000:.3f}" for e in top))
    use((4, 2))


if __name__ == "__main__":
    main()
