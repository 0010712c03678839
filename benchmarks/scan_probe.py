"""Where does the memory scan's time go? Variants of the scan kernel (as it was before 2026-11-23's change) timed at
8x2k, 1x16k and 1x32k (H=32, D=128, M=64, bf16): precomputed running gate sums, bf16 state buffers, block shapes,
and a two-level (parallel local sums, then elementwise combine) scan. Raw output of the H100 run:
docs/bench/scan_probe_2026-11-23_h100.txt.

It calls the scan of the kernels before that change: git checkout 3c2a47f -- kernels/ first.
Usage (GPU): python benchmarks/scan_probe.py"""

# ruff: noqa: B023, E731  (timing closures are built and called within one loop iteration)
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from t2r.kernels import chunk as gt


@triton.jit
def _sequence(cu_ptr, segoff_ptr, Hkv: tl.constexpr):
    """KV head, token bounds and first segment of the (sequence, KV head) of program_id(1)."""
    i_nh = tl.program_id(1)
    n = i_nh // Hkv
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    return i_nh % Hkv, bos, eos, tl.load(segoff_ptr + n).to(tl.int64)


@triton.jit
def _scan_v(x_ptr, s_ptr, g_ptr, b_ptr, hbuf_ptr, cu_ptr, segoff_ptr, Hkv: tl.constexpr, D: tl.constexpr,
            M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, PRE_B: tl.constexpr,
            HB16: tl.constexpr, STORE: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    d0 = tl.program_id(0) * BD
    m0 = tl.program_id(2) * BM
    h, bos, eos, seg0 = _sequence(cu_ptr, segoff_ptr, Hkv)
    rd = d0 + tl.arange(0, BD)
    rm = m0 + tl.arange(0, BM)
    internal = rd[:, None] * M + rm[None, :]
    state = tl.zeros([BD, BM], dtype=tl.float32)
    rt = tl.arange(0, BS)
    nseg = tl.cdiv(eos - bos, BS)
    for i in range(nseg):
        if STORE:
            if HB16:
                tl.store(hbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, state.to(tl.bfloat16))
            else:
                tl.store(hbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, state)
        t = bos + i * BS + rt
        valid = t < eos
        x = gt._load_cols(x_ptr, t, valid, Hkv, h, D, d0, BD)
        s = gt._load_cols(s_ptr, t, valid, Hkv, h, M, m0, BM)
        if PRE_B:
            b = gt._load_cols(b_ptr, t, valid, Hkv, h, M, m0, BM)
            tl_last = tl.minimum(bos + i * BS + BS, eos) - 1
            b_last = tl.load(b_ptr + (tl_last * Hkv + h) * M + rm)
        else:
            g = gt._load_cols(g_ptr, t, valid, Hkv, h, M, m0, BM)
            b = tl.cumsum(g, axis=0)
            b_last = tl.sum(g, axis=0)
        w = s * tl.exp(b_last[None, :] - b)
        if DOT == 0:
            state = state * tl.exp(b_last)[None, :] + tl.dot(tl.trans(x), w, input_precision="tf32")
        else:
            state = state * tl.exp(b_last)[None, :] + tl.dot(tl.trans(x.to(tl.bfloat16)), w.to(tl.bfloat16))


@triton.jit
def _local_kernel(
    x_ptr,
    s_ptr,
    b_ptr,
    dh_ptr,
    dec_ptr,
    seg_ptr,
    cu_ptr,
    Hkv: tl.constexpr,
    D: tl.constexpr,
    M: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
):
    """Two-level scan, phase A: every segment's own contribution x^T (s exp(b_last - b)) and its decay."""
    i_s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d0 = tl.program_id(2) * BD
    n = tl.load(seg_ptr + 2 * i_s)
    t0 = tl.load(seg_ptr + 2 * i_s + 1).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, BS)
    valid = t < eos
    rm = tl.arange(0, M)
    x = gt._load_cols(x_ptr, t, valid, Hkv, h, D, d0, BD)
    s = gt._load_rows(s_ptr, t, valid, Hkv, h, M)
    b = gt._load_rows(b_ptr, t, valid, Hkv, h, M)
    t_last = tl.minimum(t0 + BS, eos) - 1
    b_last = tl.load(b_ptr + (t_last * Hkv + h) * M + rm)
    w = s * tl.exp(b_last[None, :] - b)
    dh = tl.dot(tl.trans(x), w, input_precision="tf32")
    rd = d0 + tl.arange(0, BD)
    tl.store(dh_ptr + (i_s * Hkv + h) * D * M + rd[:, None] * M + rm[None, :], dh)
    if d0 == 0:
        tl.store(dec_ptr + (i_s * Hkv + h) * M + rm, tl.exp(b_last))


@triton.jit
def _combine_kernel(dh_ptr, dec_ptr, cu_ptr, segoff_ptr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                    BS: tl.constexpr, BE: tl.constexpr):  # fmt: skip
    """Phase B: in place, segment contributions -> states at segment starts (elementwise, sequential)."""
    e0 = tl.program_id(0) * BE
    h, bos, eos, seg0 = _sequence(cu_ptr, segoff_ptr, Hkv)
    re = e0 + tl.arange(0, BE)
    state = tl.zeros([BE], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BS)):
        p = dh_ptr + ((seg0 + i) * Hkv + h) * D * M + re
        d = tl.load(p)
        dec = tl.load(dec_ptr + ((seg0 + i) * Hkv + h) * M + re % M)
        tl.store(p, state)
        state = state * dec + d


@triton.jit
def _local_cumsum_kernel(g_ptr, b_ptr, seg_ptr, cu_ptr, Hkv: tl.constexpr, M: tl.constexpr, BS: tl.constexpr):
    i_s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = tl.load(seg_ptr + 2 * i_s)
    t0 = tl.load(seg_ptr + 2 * i_s + 1).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, BS)
    valid = t < eos
    g = gt._load_rows(g_ptr, t, valid, Hkv, h, M)
    gt._store_rows(b_ptr, tl.cumsum(g, axis=0), t, valid, Hkv, h, M)


def main():
    torch.manual_seed(0)
    H, D, M, BS = 32, 128, 64, 64
    for B, T in ((8, 2048), (1, 16384), (1, 32768)):
        x = torch.randn(B * T, H, D, device="cuda", dtype=torch.bfloat16)
        s = torch.rand(B * T, H, M, device="cuda", dtype=torch.bfloat16)
        g = (-torch.rand(B * T, H, M, device="cuda") * 0.1).to(torch.bfloat16)
        plan = gt._Plan(B, T, None, x.device, BS)
        prec = gt.precision(torch.bfloat16)
        ref = lambda: gt._state_scan(x, s, g, None, plan, (M, 1), prec, False)[0]
        href = ref()
        t_ref = do_bench(ref)
        b = torch.empty(B * T, H, M, device="cuda", dtype=torch.float32)
        _local_cumsum_kernel[(plan.NS, H)](g, b, plan.segs, plan.cu, Hkv=H, M=M, BS=BS)
        t_cs = do_bench(lambda: _local_cumsum_kernel[(plan.NS, H)](g, b, plan.segs, plan.cu, Hkv=H, M=M, BS=BS))
        print(
            f"== {B}x{T}: current scan {t_ref:.3f} ms ({plan.N * H * D // 32} programs); "
            f"chunk-local cumsum {t_cs:.3f} ms",
            flush=True,
        )
        for BD, BM, pre, hb16, store, dot, warps, stages in [
            (32, 64, 0, 0, 1, 0, 4, 2),
            (32, 64, 1, 0, 1, 0, 4, 2),
            (32, 64, 0, 1, 1, 0, 4, 2),
            (32, 64, 0, 0, 0, 0, 4, 2),
            (32, 64, 1, 1, 1, 0, 4, 2),
            (32, 64, 1, 1, 1, 1, 4, 2),
            (64, 64, 1, 1, 1, 1, 4, 2),
            (32, 32, 1, 1, 1, 1, 4, 2),
            (16, 32, 1, 1, 1, 1, 4, 2),
            (32, 32, 1, 1, 1, 1, 2, 3),
            (16, 32, 1, 1, 1, 1, 2, 3),
            (64, 32, 1, 1, 1, 1, 4, 3),
            (32, 64, 0, 0, 1, 0, 4, 3),
            (32, 64, 0, 0, 1, 0, 8, 2),
            (128, 64, 1, 1, 1, 1, 8, 2),
        ]:
            hbuf = torch.zeros(plan.NS, H, D, M, device="cuda", dtype=torch.bfloat16 if hb16 else torch.float32)
            grid = (D // BD, plan.N * H, M // BM)
            f = lambda: _scan_v[grid](
                x,
                s,
                g,
                b,
                hbuf,
                plan.cu,
                plan.segoff,
                Hkv=H,
                D=D,
                M=M,
                BS=BS,
                BD=BD,
                BM=BM,
                PRE_B=pre,
                HB16=hb16,
                STORE=store,
                DOT=dot,
                num_warps=warps,
                num_stages=stages,
            )
            f()
            err = ((hbuf.float() - href).norm() / href.norm()).item() if store else float("nan")
            tv = do_bench(f)
            print(
                f"BD={BD:3d} BM={BM} preb={pre} hb16={hb16} store={store} dot={'bf16' if dot else 'tf32'} "
                f"w={warps} st={stages}: {tv:.3f} ms ({tv / t_ref:.2f}x)  rel err {err:.1e}  "
                f"programs {grid[0] * grid[1] * grid[2]}",
                flush=True,
            )
        # Two-level: parallel local contributions, then the elementwise combine.
        dh = torch.empty(plan.NS, H, D, M, device="cuda", dtype=torch.float32)
        dec = torch.empty(plan.NS, H, M, device="cuda", dtype=torch.float32)
        for BD in (32, 64, 128):
            fa = lambda: _local_kernel[(plan.NS, H, D // BD)](
                x, s, b, dh, dec, plan.segs, plan.cu, Hkv=H, D=D, M=M, BS=BS, BD=BD, num_warps=4
            )
            ta = do_bench(fa)
            print(f"two-level phase A BD={BD}: {ta:.3f} ms", flush=True)
        for BE in (256, 512, 1024, 2048):
            for warps in (2, 4):

                def fab():
                    fa()
                    _combine_kernel[(D * M // BE, plan.N * H)](
                        dh, dec, plan.cu, plan.segoff, Hkv=H, D=D, M=M, BS=BS, BE=BE, num_warps=warps
                    )

                fab()
                err = ((dh - href).norm() / href.norm()).item()
                tab = do_bench(fab)
                print(
                    f"two-level A+B BE={BE} w={warps}: {tab:.3f} ms ({tab / t_ref:.2f}x) rel err {err:.1e}", flush=True
                )


if __name__ == "__main__":
    main()
