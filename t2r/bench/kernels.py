"""Kernel-level benchmark: t2r's GSA kernels vs flash-linear-attention's (if installed) vs SDPA, one run.

Layer shapes (``LAYERS``): the kernels issue's (H = Hkv = 32, K = V = 128, M = 64, bf16), and real models' with
their GQA groups, which change how much each program holds (chunk_jit.py's docstring). Times are medians of
CUDA-event timings from ``triton.testing.do_bench`` (which flushes L2 between runs); every row is measured in this
process, so the ratios compare like with like. FLA is a comparison only: t2r never imports it elsewhere.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

TRAIN_SHAPES = [(8, 2048), (2, 8192), (1, 16384), (1, 32768)]
# (tokens, vocabulary) of the loss rows: SmolLM2's vocabulary at 16k tokens, Llama-3's at 8k
LOSS_SHAPES = [(16384, 49152), (8192, 128256)]
# name -> (query heads, KV heads, head dim (K = V), slots)
LAYERS = {"issue": (32, 32, 128, 64), "smollm2-135m": (9, 3, 64, 64), "mistral-7b": (32, 8, 128, 64)}


# Where the benchmark runs. Users time CUDA only; the CPU tests run every row at tiny shapes on "cpu" (Triton's
# interpreter, one untimed call per row), so the orchestration is exercised before a GPU call is spent on it.
DEVICE = "cuda"
# The correctness checks each run starts with: GQA 2 at a length that ends mid-segment, and a long one (dg's
# error used to grow with the length).
CHECKS = {
    "rel_error_vs_reference": dict(B=2, T=700, H=8, Hkv=4, K=128, V=128, M=64),
    "rel_error_vs_reference_16k": dict(B=1, T=16384, H=4, Hkv=4, K=128, V=128, M=64),
}


def _on_gpu() -> bool:
    return torch.device(DEVICE).type == "cuda"


def _bench(fn, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    if not _on_gpu():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graphed_ms(calls: list[Callable[[], object]], min_calls: int = 32, rounds: int = 20) -> float:
    """Milliseconds per call, ``calls`` replayed in turn from one CUDA graph (repeated to at least ``min_calls``).

    A decoding step takes a few microseconds on the GPU and tens on the host to launch, so an eager timing measures
    the host (and its jitter); a replay is what a captured decoding step pays. Where each call holds its own inputs
    (``copies``), the data they read together outgrows L2, as a model's layers do one after another."""
    if not _on_gpu():
        start = time.perf_counter()
        calls[0]()
        return (time.perf_counter() - start) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    sequence = calls * -(-min_calls // len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (rounds * len(sequence))


def copies(nbytes: int, most: int = 4096) -> int:
    """How many copies of ``nbytes`` of inputs fill four times the GPU's L2 (one on the CPU)."""
    if not _on_gpu():
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
    return max(1, min(most, -(-4 * l2 // max(nbytes, 1))))


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device bytes/s of a large copy (bytes read + written): the floor the memory-bound kernels face."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3)


def _inputs(B, T, H, K, V, M, dtype, requires_grad=True, Hkv=None):
    def t(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)

    Hkv = Hkv or H
    q, k, v = t(B, T, H, K), t(B, T, Hkv, K), t(B, T, Hkv, V)
    f = torch.randn(B, T, Hkv, M, device=DEVICE)
    g = (F.logsigmoid(f) / 8).to(dtype).requires_grad_(requires_grad)
    s = (1 - g.detach().float().exp()).to(dtype).requires_grad_(requires_grad)
    return q, k, v, s, g


def decode_inputs(B, H, K, V, M, dtype, Hkv=None):
    """One token per sequence and a random fp32 state (keys memory, values memory) for decode timings."""
    Hkv = Hkv or H
    state = (torch.randn(B, Hkv, K, M, device=DEVICE), torch.randn(B, Hkv, M, V, device=DEVICE))
    return _inputs(B, 1, H, K, V, M, dtype, requires_grad=False, Hkv=Hkv), state


def state_floor_ms(state, bandwidth: float) -> float:
    """The decode step's memory floor: every fp32 memory read and written once at ``bandwidth`` bytes/s."""
    return 2 * sum(x.numel() * x.element_size() for x in state) / bandwidth * 1e3


def state_copy_ms(state) -> float:
    """A plain copy of as many bytes as the state (read + written once): what the decode step's traffic costs at
    its own size, where a 1 GiB copy's bandwidth (the floor above) is out of reach."""
    nbytes = 2 * sum(x.numel() * x.element_size() for x in state)
    pairs = [(src := torch.cat([x.flatten() for x in state]), torch.empty_like(src)) for _ in range(copies(nbytes))]
    return graphed_ms([lambda src=src, dst=dst: dst.copy_(src) for src, dst in pairs])


def launch_ms() -> float:
    """One launch that does next to nothing (a one-element fill), replayed from a graph: what any kernel of a
    few-microsecond decoding step pays before its own work, ours and FLA's alike."""
    x = torch.zeros(1, device=DEVICE)
    return graphed_ms([lambda: x.fill_(0.0)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _fla():
    try:
        from fla.ops.gsa import chunk_gsa
        from fla.ops.gsa.fused_recurrent import fused_recurrent_gsa_inference
    except ImportError:
        return None, None
    return chunk_gsa, fused_recurrent_gsa_inference


def _fwd_bwd(fn, inputs, do):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(do)

    return run


def _train_row(B, T, H, K, V, M, dtype, bandwidth, fla: bool, Hkv=None, layer="issue") -> dict:
    from t2r.kernels.chunk import gsa_chunk_triton

    chunk_gsa = _fla()[0] if fla else None
    inputs = _inputs(B, T, H, K, V, M, dtype, Hkv=Hkv)
    q, k, v, s, g = inputs
    do = torch.randn(B, T, H, V, device=DEVICE, dtype=dtype)
    scale = K**-0.5

    def ours():
        return gsa_chunk_triton(q, k, v, s, g, scale)[0]

    row = {
        "layer": layer,
        "B": B,
        "T": T,
        "ours_fwd_ms": _bench(ours),
        "ours_fwdbwd_ms": _bench(_fwd_bwd(ours, inputs, do)),
    }
    row["ours_kept_gb"] = _kept_gb(ours)
    with keeping_forward_buffers():
        row["ours_keep_fwdbwd_ms"] = _bench(_fwd_bwd(ours, inputs, do))
        row["ours_keep_kept_gb"] = _kept_gb(ours)
    if chunk_gsa is not None:

        def fla():
            return chunk_gsa(q, k, v, s, g, scale=scale)[0]

        row["fla_fwd_ms"] = _bench(fla)
        row["fla_fwdbwd_ms"] = _bench(_fwd_bwd(fla, inputs, do))
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=kt.shape[1] != qt.shape[1])

    row["sdpa_fwd_ms"] = _bench(sdpa)
    row["sdpa_fwdbwd_ms"] = _bench(_fwd_bwd(sdpa, (qt, kt, vt), do.transpose(1, 2)))
    if bandwidth:  # reading q, k, v, s, g and writing o once: no kernel can beat this
        nbytes = sum(x.numel() * x.element_size() for x in inputs) + do.numel() * do.element_size()
        row["fwd_floor_ms"] = nbytes / bandwidth * 1e3
    return _with_ratios(row)


@contextlib.contextmanager
def keeping_forward_buffers():
    """Our kernels with T2R_GSA_SAVE_STATES=1 and T2R_GSA_SAVE_PROBS=1: the backward reuses the forward's segment
    states and slot softmax (memory for speed)."""

    from t2r.kernels.tuning import tuned

    with tuned(save_states=True, save_probs=True):
        yield


def _kept_gb(forward) -> float:
    """Device memory a forward leaves held for its backward, beyond its output."""
    if not _on_gpu():
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    del out
    return kept / 2**30


def train_rows(shapes=TRAIN_SHAPES, layer="issue", *, dtype=torch.bfloat16, bandwidth=None, fla=True):
    H, Hkv, D, M = LAYERS[layer]
    rows = []
    for B, T in shapes:
        rows.append(_train_row(B, T, H, D, D, M, dtype, bandwidth, fla, Hkv=Hkv, layer=layer))
        if _on_gpu():
            torch.cuda.empty_cache()
    return rows


def _with_ratios(row: dict) -> dict:
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
    if "fla_fwd_ms" in row:
        out["fla/ours_fwd"] = round(row["fla_fwd_ms"] / row["ours_fwd_ms"], 2)
        out["fla/ours_fwdbwd"] = round(row["fla_fwdbwd_ms"] / row["ours_fwdbwd_ms"], 2)
    out["sdpa/ours_fwdbwd"] = round(row["sdpa_fwdbwd_ms"] / row["ours_fwdbwd_ms"], 2)
    if "ours_keep_fwdbwd_ms" in row:  # the same ratios with the forward's buffers kept
        if "fla_fwdbwd_ms" in row:
            out["fla/ours_keep_fwdbwd"] = round(row["fla_fwdbwd_ms"] / row["ours_keep_fwdbwd_ms"], 2)
        out["sdpa/ours_keep_fwdbwd"] = round(row["sdpa_fwdbwd_ms"] / row["ours_keep_fwdbwd_ms"], 2)
    if "fwd_floor_ms" in row:
        out["ours_fwd/floor"] = round(row["ours_fwd_ms"] / row["fwd_floor_ms"], 2)
    return out


def decode_rows(B=16, layer="issue", *, context=32768, dtype=torch.bfloat16, bandwidth=None, fla=True):
    """One decoding step: our fused in-place update vs FLA's fused recurrent inference kernel vs softmax
    attention of one query over a KV cache of ``context`` tokens (SDPA). Each is timed as a graph's replay over
    copies of its inputs (``graphed_ms``), as a captured decoding step runs it."""
    from t2r.kernels.decode import gsa_decode_triton

    H, Hkv, K, M = LAYERS[layer]
    fla_step = _fla()[1] if fla else None
    (q, k, v, s, g), state = first = decode_inputs(B, H, K, K, M, dtype, Hkv=Hkv)
    nbytes = sum(x.numel() * x.element_size() for x in (q, k, v, s, g, *state))
    sets = [first] + [decode_inputs(B, H, K, K, M, dtype, Hkv=Hkv) for _ in range(copies(nbytes) - 1)]
    scale = K**-0.5
    row = {
        "layer": layer,
        "B": B,
        "H": H,
        "ours_step_ms": graphed_ms([lambda x=x, h=h: gsa_decode_triton(*x, scale, h) for x, h in sets]),
    }
    if fla_step is not None:
        row["fla_step_ms"] = graphed_ms([lambda x=x, h=h: fla_step(*x, h, True, scale) for x, h in sets])
    del sets
    kv = torch.randn(2, B, Hkv, context, K, device=DEVICE, dtype=dtype)
    qt = q.transpose(1, 2)
    gqa = Hkv != H
    row[f"kv_cache_{context // 1024}k_ms"] = graphed_ms(
        [lambda: F.scaled_dot_product_attention(qt, kv[0], kv[1], enable_gqa=gqa)]
    )
    if bandwidth:
        row["state_floor_ms"] = state_floor_ms(state, bandwidth)
        row["ours/floor"] = row["ours_step_ms"] / row["state_floor_ms"]
    row["state_copy_ms"] = state_copy_ms(state)
    row["ours/state_copy"] = row["ours_step_ms"] / row["state_copy_ms"]
    row["launch_ms"] = launch_ms()
    if "fla_step_ms" in row:
        row["fla/ours"] = row["fla_step_ms"] / row["ours_step_ms"]
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}]


def check_against_reference(B=2, T=700, H=8, Hkv=4, K=128, V=128, M=64, dtype=torch.bfloat16) -> dict:
    """Relative error of our kernels vs the PyTorch reference (fp32 on the same inputs) for the output, the
    final state and every gradient: the timings below are only worth reading if these are small."""
    from t2r.kernels.chunk import gsa_chunk_triton
    from t2r.kernels.reference import gsa_chunk

    q, k, v, s, g = _inputs(B, T, H, K, V, M, dtype)
    k, v, s, g = (x.detach()[:, :, :Hkv].contiguous().requires_grad_() for x in (k, v, s, g))
    h0 = tuple(torch.randn(B, Hkv, *shape, device=DEVICE, requires_grad=True) for shape in ((K, M), (M, V)))
    do = torch.randn(B, T, H, V, device=DEVICE)
    errors = {}
    results = []
    for fn in (gsa_chunk_triton, gsa_chunk):
        fp32 = [x.detach().float().requires_grad_() for x in (q, k, v, s, g)]
        inputs = [q, k, v, s, g] if fn is gsa_chunk_triton else fp32
        o, (hk, hv) = fn(*inputs, None, h0, True)
        loss = (o.float() * do).sum() + hk.sum() + (hv * hv).sum() / 100
        grads = torch.autograd.grad(loss, [*inputs, *h0])
        results.append([o, hk, hv, *grads])
    names = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"]
    for name, a, b in zip(names, *results, strict=True):
        errors[name] = rel_err(a, b)
    return {k: f"{v:.1e}" for k, v in errors.items()}


def loss_rows(shapes=LOSS_SHAPES, dtype=torch.bfloat16, bandwidth=None) -> list[dict]:
    """The training loss (next-token cross-entropy, forward and backward) over one row of ``tokens`` logits: the
    chunked PyTorch loss (t2r.train.losses, T2R_GSA_FUSED_CE=0) against the fused kernels (the default), with
    their relative differences (the timings are only worth reading if these are small) and the memory each takes
    beyond its logits and their gradient."""
    rows = []
    for N, V in shapes:
        rows.append(_loss_row(N, V, dtype, bandwidth))
        if _on_gpu():
            torch.cuda.empty_cache()
    return rows


def _loss_row(N: int, V: int, dtype: torch.dtype, bandwidth: float | None) -> dict:
    from t2r.bench.throughput import _peak_gb, _peak_reset
    from t2r.kernels.tuning import tuned
    from t2r.train.losses import ce_loss_sum

    logits = torch.randn(1, N, V, device=DEVICE, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (1, N), device=DEVICE)

    def run() -> torch.Tensor:
        logits.grad = None
        loss = ce_loss_sum(logits, labels)
        loss.backward()
        return loss

    row: dict = {"tokens": N, "vocab": V}
    results = []
    for name, fused in (("chunked", False), ("fused", True)):
        with tuned(fused_ce=fused, **({} if _on_gpu() else {"impl": "triton"})):  # CPU: the interpreter
            results.append((run().detach(), logits.grad.clone()))
            held = torch.cuda.memory_allocated() if _on_gpu() else 0
            _peak_reset()
            run()
            row[f"{name}_extra_gb"] = round(_peak_gb() - held / 2**30, 3)  # NaN off the GPU
            row[f"{name}_fwdbwd_ms"] = _bench(run)
    row["rel_err_loss"] = f"{rel_err(results[1][0], results[0][0]):.1e}"
    row["rel_err_grad"] = f"{rel_err(results[1][1], results[0][1]):.1e}"
    row["chunked/fused"] = round(row["chunked_fwdbwd_ms"] / row["fused_fwdbwd_ms"], 2)
    if bandwidth:  # the logits read forward and backward, their gradient written once
        row["floor_ms"] = 3 * logits.numel() * logits.element_size() / bandwidth * 1e3
        row["fused/floor"] = round(row["fused_fwdbwd_ms"] / row["floor_ms"], 2)
    return row


def run_kernel_bench(
    shapes=TRAIN_SHAPES, fla: bool = True, decode_batches=(1, 16, 64), layers=("issue",), losses=LOSS_SHAPES
) -> dict:
    if _on_gpu() and not torch.cuda.is_available():
        from t2r.errors import T2RError

        raise T2RError("t2r bench kernels needs a CUDA device")
    bandwidth = copy_bandwidth(2**30 if _on_gpu() else 2**20)
    return {
        "device": torch.cuda.get_device_name() if _on_gpu() else DEVICE,
        **{name: check_against_reference(**shape) for name, shape in CHECKS.items()},
        "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
        "fla": fla and _fla()[0] is not None,
        "train": [row for layer in layers for row in train_rows(shapes, layer, bandwidth=bandwidth, fla=fla)],
        "decode": [
            row
            for layer in layers
            for B in decode_batches
            for row in decode_rows(B, layer, bandwidth=bandwidth, fla=fla)
        ],
        "loss": loss_rows(losses, bandwidth=bandwidth),
    }
