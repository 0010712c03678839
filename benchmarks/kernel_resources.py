"""Registers, spills and shared memory of every GSA Triton kernel, compiled for an H100 (sm_90) on any machine.

No GPU needed: Triton compiles for a named target and cuobjdump (shipped with Triton) reads the cubin. Run it
before spending GPU time on a kernel change: register pressure and spills (STACK > 0) are what sank the
chunk-parallel forward (docs/benchmarks.md). Shapes are the kernels issue's (K = V = 128, M = 64, H = Hkv = 32,
bf16 inputs), launch settings those the host code would pick at 1 x 16k.

Usage: python benchmarks/kernel_resources.py [JIT_FILE ...]   (default: t2r/kernels/chunk_jit.py decode_jit.py)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from t2r.kernels.chunk import _launch_cfg
from t2r.kernels.tuning import TUNING

# Tensors in the inputs' dtype (the rest are fp32 work buffers): x and a stand for k / v and q / do.
HALF_INPUTS = {"q_ptr", "k_ptr", "v_ptr", "s_ptr", "g_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "ds_ptr",
               "x_ptr", "a_ptr", "dx_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr", "pk_ptr", "pv_ptr", "sk_ptr",
               "sv_ptr", "out_ptr", "f_ptr", "vo_ptr", "dqo_ptr", "dko_ptr", "dvo_ptr", "df_ptr", "h_ptr", "u_ptr",
               "dh_ptr", "dg_ptr", "du_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "w3_ptr", "b0_ptr", "b1_ptr", "b2_ptr",
               "b3_ptr", "nw_ptr", "r_ptr"}  # fmt: skip
BOOL_POINTERS = {"pvalid_ptr", "nvalid_ptr"}
INT_POINTERS = {"cu_ptr", "segoff_ptr", "seg_ptr", "keep_ptr"}
LONG_POINTERS = {"y_ptr", "head_ptr", "slot_ptr"}  # labels; the window ring's heads
INT_SCALARS = {"T", "stride_pd", "stride_pm", "d0", "keep_stride", "N", "cs_batch", "H", "Hkv", "P", "stride_kb",
               "stride_kt", "stride_vb", "stride_vt", "stride_valid", "mix_stride", "R", "per_program", "sq", "sk",
               "sv", "sf", "keep_sb", "keep_st", "sg", "su", "V", "stride", "stride_s", "stride_t", "S", "CH", "W",
               "PARTS", "parts", "hidden_stride", "C", "M", "K", "stride_x", "N0", "N1", "N2", "N3", "T0", "T1", "T2",
               "HB0", "HB1", "HB2", "HB3", "KB", "stride_u", "stride_r"}  # fmt: skip
CONSTEXPRS = dict(H=32, Hkv=32, K=128, V=128, M=64, D=128, BS=64, BC=16, BD=64, BM=32, GP=1, BK=32, BV=32, PREC_IN=0,
                  PREC=3, PREC_O=3, EXP_CLAMP=60.0, HAS_INIT=False, STORE_OUT=True, REVERSE=False, MEMORY=0,
                  STORE_LSE=True, RAW=True, FM=1, HAS_KEEP=True, BLOCK=1024, HALF=32, BH=16, BHK=4, BW=32,
                  HAS_SINK=True, STORE_RSTD=True, HAS_DW=True, NQ=4096, NK=1024, NV=1024, NF=512,
                  BLOCK_Q=4096, BLOCK_K=1024, BLOCK_V=1024, BLOCK_F=512, PARTS=8, IGNORE=-100, HAS_W=True,
                  QP=16, DP=128, HAS_PROJ=True, RB=128, BN=32, NORM=True, GLU=False, RES=True, PDL=True)  # fmt: skip
# (The decode step as the model launches it: from the projections, with a padding mask; RMSNorm rows of 576;
# RoPE of SmolLM2's 9 query and 3 key heads of 64; the window step's two kernels: GP 1 with H = Hkv, D 128, the
# router's read of the hidden state in the merge.)


def load_kernels(path: str):
    name = "t2r.kernels._resources_probe_" + os.path.basename(path).removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def signature(fn, **overrides) -> tuple[dict, dict]:
    sig, consts = {}, {}
    for name, param in zip(fn.arg_names, fn.params, strict=True):
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", overrides.get(name, CONSTEXPRS[name])
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name in LONG_POINTERS:
            sig[name] = "*i64"
        elif name in BOOL_POINTERS:
            sig[name] = "*i1"
        elif name.endswith(("_ptr", "_buf")):
            sig[name] = "*bf16" if name in HALF_INPUTS else "*fp32"
        else:
            sig[name] = "i32" if name in INT_SCALARS else "fp32"
    return sig, consts


def resources(fn, warps: int, stages: int, **overrides) -> str:
    sig, consts = signature(fn, **overrides)
    return resources_of(fn, {n: t for n, t in sig.items() if t != "constexpr"}, consts, warps, stages)


def compile_sm90(fn, types: dict[str, str], consts: dict, warps: int, stages: int):
    """``fn`` compiled for sm_90 with these argument types and constexpr values (Triton's cache applies)."""
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})  # fmt: skip


def resources_of(fn, types: dict[str, str], consts: dict, warps: int, stages: int, compiled=None) -> str:
    """``fn`` compiled for sm_90 with these argument types and constexpr values (or ``compiled``, that compile):
    its cuobjdump resource line."""
    compiled = compiled or compile_sm90(fn, types, consts, warps, stages)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return " ".join(x for x in line.split() if x.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))


def main() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "t2r", "kernels")
    files = (
        "chunk_jit.py",
        "decode_jit.py",
        "norm.py",
        "prologue.py",
        "rotary.py",
        "swiglu.py",
        "window.py",
        "cross_entropy.py",
        "grouped_linear.py",
    )
    paths = sys.argv[1:] or [os.path.join(here, name) for name in files]
    sweeps = _launch_cfg(128, 128, 64)
    found = {}
    for path in paths:
        module = load_kernels(os.path.normpath(path))
        found |= {n: getattr(module, n) for n in dir(module) if n.endswith("_kernel")}
    print(f"{' '.join(paths)}: sm_90, K = V = 128, M = 64, H = Hkv = 32, bf16 inputs")
    for name in sorted(found):
        fn = found[name]
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            continue
        sweep = "BC" in fn.arg_names  # walks sub-chunks: launched with the host's _launch_cfg
        warps, stages = (sweeps["num_warps"], sweeps["num_stages"]) if sweep else (4, 3 if "state" in name else 2)
        if name in ("_slot_probs_kernel", "_out_blocks_kernel", "_slot_grads_kernel"):  # segment-at-once
            warps = TUNING.fwd_warps
        # A kernel with both directions (REVERSE), or one memory or both (MEMORY), is two compiled programs: a row each.
        variants = {"": {}}
        if "REVERSE" in fn.arg_names:
            variants = {"": dict(REVERSE=False), " (reverse)": dict(REVERSE=True)}
        if "MEMORY" in fn.arg_names:
            variants = {"": dict(MEMORY=0), " (both)": dict(MEMORY=2)}
        for suffix, overrides in variants.items():
            label = name + suffix
            try:
                report = resources(fn, warps, stages, **overrides)
            except Exception as err:  # a kernel this table cannot build: say so, go on with the others
                report = f"not compiled here: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            print(f"{label:38s} warps {warps} stages {stages}: {report}")


if __name__ == "__main__":
    main()
