"""A/B of kernel versions in one process: the checkout's chunked kernels vs those of other revisions (fwd and
fwd+bwd, bf16, the layer shapes of t2r.bench.kernels.LAYERS named in $LAYERS, default "issue": H=32, K=V=128,
M=64), each checked against the checkout's outputs and gradients.

Usage (GPU): mkdir /tmp/rev && git archive REV t2r/kernels | tar -x -C /tmp/rev    (this layout: a directory)
             git show REV:kernels/gsa_triton.py > /tmp/k_rev.py                   (before the split: one file)
             python benchmarks/ab_kernels.py /tmp/rev/t2r/kernels [/tmp/k_rev.py:SEGMENT:SUBCHUNK ...]
             PROFILE=main,/tmp/rev/t2r/kernels python benchmarks/ab_kernels.py   (per-kernel CUDA time)
             LAYERS=smollm2-135m,mistral-7b python benchmarks/ab_kernels.py ...  (real models' GQA shapes)"""

# ruff: noqa: B023  (timing closures are built and called within one loop iteration)
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys

import torch
from triton.testing import do_bench

from t2r.bench.kernels import LAYERS, _inputs
from t2r.kernels import memo, reference
from t2r.kernels.chunk import gsa_chunk_triton


def _import(name: str, path: str, package_dir: str | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load(spec_str):
    """PATH[:SEGMENT:SUBCHUNK] -> that version's chunked GSA function, imported under its own name with those
    tunables (read from the environment when its tuning module loads)."""
    path, *tun = spec_str.split(":")
    env = dict(zip(("T2R_GSA_SEGMENT", "T2R_GSA_SUBCHUNK"), tun, strict=False))
    os.environ.update(env)
    name = "t2r_ab_" + re.sub(r"\W", "_", "_".join([path, *tun]))
    try:
        if os.path.isdir(path):
            _import(name, os.path.join(path, "__init__.py"), path)
            return importlib.import_module(name + ".chunk").gsa_chunk_triton
        # One file from before the split: its relative imports named the memo and reference modules by old names.
        sys.modules.setdefault("t2r.kernels.gsa_memo", memo)
        sys.modules.setdefault("t2r.kernels.gsa_reference", reference)
        reference._check = reference.check_inputs
        return _import("t2r.kernels." + name, path).gsa_triton
    finally:
        for key in env:
            os.environ.pop(key, None)


def run(fn, inputs, do):
    for x in inputs:
        x.grad = None
    o = fn(*inputs)[0]
    o.backward(do)
    return [o.detach()] + [x.grad for x in inputs]


def layers() -> list[str]:
    return os.environ.get("LAYERS", "issue").split(",")


def layer_inputs(layer: str, B: int, T: int):
    H, Hkv, D, M = LAYERS[layer]
    return _inputs(B, T, H, D, D, M, torch.bfloat16, Hkv=Hkv)


def main():
    variants = {"main": gsa_chunk_triton, **{p: load(p) for p in sys.argv[1:]}}
    for layer in layers():
        for B, T in ((8, 2048), (2, 8192), (1, 16384), (1, 32768)):
            print(ab_line(variants, layer, B, T), flush=True)


def ab_line(variants, layer: str, B: int, T: int) -> str:
    inputs = layer_inputs(layer, B, T)
    do = torch.randn_like(inputs[0])
    ref = run(variants["main"], inputs, do)
    line = f"{layer} {B}x{T}:"
    for name, fn in variants.items():
        out = run(fn, inputs, do)
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref, strict=True))
        fwd = do_bench(lambda: fn(*inputs), warmup=5, rep=40)
        fb = do_bench(lambda: run(fn, inputs, do), warmup=5, rep=40)
        line += f"  {name}: fwd {fwd:.2f} fwd+bwd {fb:.2f} ms (max rel diff to main {err:.1e})"
    return line


def profile(path, B=1, T=16384, layer="issue"):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_

    fn = load(path) if path != "main" else gsa_chunk_triton
    inputs = layer_inputs(layer, B, T)
    do = torch.randn_like(inputs[0])
    for _ in range(3):
        run(fn, inputs, do)
    torch.cuda.synchronize()
    with prof_(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            run(fn, inputs, do)
        torch.cuda.synchronize()
    print(f"== {path} {layer} B={B} T={T}: CUDA time per forward+backward, by kernel")
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:14]:
        print(f"{e.key[:60]:60s} {e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5}")


if __name__ == "__main__":
    if os.environ.get("PROFILE"):
        for path in os.environ["PROFILE"].split(","):
            for layer in layers():
                for B, T in ((8, 2048), (1, 16384)):
                    profile(path, B, T, layer)
    else:
        main()
