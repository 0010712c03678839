"""A/B of kernel versions in one process: the checkout's kernels vs copies of gsa_triton.py from other revisions
(fwd and fwd+bwd, bf16, H=32, K=V=128, M=64), each checked against the checkout's outputs and gradients.

Usage (GPU): git show REV:t2r/kernels/gsa_triton.py (kernels/gsa_triton.py before the move) > /tmp/k_rev.py
             python benchmarks/ab_kernels.py /tmp/k_rev.py [/tmp/k_rev.py:SEGMENT:SUBCHUNK ...]
             PROFILE=main,/tmp/k_rev.py python benchmarks/ab_kernels.py   (per-kernel CUDA time)"""

# ruff: noqa: B023  (timing closures are built and called within one loop iteration)
from __future__ import annotations

import importlib.util
import os
import sys

import torch
from triton.testing import do_bench

import t2r.kernels  # noqa: F401
from t2r.bench.kernels import _inputs
from t2r.kernels import gsa_triton as main_k


def load(spec_str):
    """PATH[:SEGMENT:SUBCHUNK] -> the module, imported under its own name with those tunables."""
    path, *tun = spec_str.split(":")
    if tun:
        os.environ["T2R_GSA_SEGMENT"], os.environ["T2R_GSA_SUBCHUNK"] = tun
    name = "t2r.kernels." + os.path.basename(path)[:-3] + "_".join(["", *tun])
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    os.environ.pop("T2R_GSA_SEGMENT", None), os.environ.pop("T2R_GSA_SUBCHUNK", None)
    return mod


def run(fn, inputs, do):
    for x in inputs:
        x.grad = None
    o = fn(*inputs)[0]
    o.backward(do)
    return [o.detach()] + [x.grad for x in inputs]


def main():
    variants = {"main": main_k, **{os.path.basename(p).replace(".py", ""): load(p) for p in sys.argv[1:]}}
    for B, T in ((8, 2048), (2, 8192), (1, 16384), (1, 32768)):
        inputs = _inputs(B, T, 32, 128, 128, 64, torch.bfloat16)
        do = torch.randn_like(inputs[0])
        ref = run(variants["main"].gsa_triton, inputs, do)
        line = f"{B}x{T}:"
        for name, mod in variants.items():
            out = run(mod.gsa_triton, inputs, do)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref, strict=True))
            fwd = do_bench(lambda: mod.gsa_triton(*inputs), warmup=5, rep=40)
            fb = do_bench(lambda: run(mod.gsa_triton, inputs, do), warmup=5, rep=40)
            line += f"  {name}: fwd {fwd:.2f} fwd+bwd {fb:.2f} ms (max rel diff to main {err:.1e})"
        print(line, flush=True)


def profile(path, B=1, T=16384):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_

    mod = load(path) if path != "main" else main_k
    inputs = _inputs(B, T, 32, 128, 128, 64, torch.bfloat16)
    do = torch.randn_like(inputs[0])
    for _ in range(3):
        run(mod.gsa_triton, inputs, do)
    torch.cuda.synchronize()
    with prof_(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            run(mod.gsa_triton, inputs, do)
        torch.cuda.synchronize()
    print(f"== {path} B={B} T={T}: CUDA time per forward+backward, by kernel")
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:14]:
        print(f"{e.key[:60]:60s} {e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5}")


if __name__ == "__main__":
    if os.environ.get("PROFILE"):
        for path in os.environ["PROFILE"].split(","):
            for B, T in ((8, 2048), (1, 16384)):
                profile(path, B, T)
    else:
        main()
