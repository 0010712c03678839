"""Where one decoding step goes: wall time per token against the GPU's busy time, kernel launches per token, and the
CUDA kernels and host-side ops that take the most, for the GSA model and for the teacher (SDPA, KV cache) over the
same weights. A step whose wall time is far above its GPU time is bound by the host (Python and launches), and
no kernel work will move it; only fewer launches per token (CUDA graphs, fused layers) will.

With ``--window N`` the GSA model is the hybrid; ``--eager`` profiles it without captured steps (the kernels a
replay runs, each named); ``--no-teacher`` leaves the teacher out.

Usage: python benchmarks/decode_profile.py [--shape smollm2-135m] [--batch 1 --batch 16] [--context 1024]
                                           [--steps 16] [--window N] [--eager] [--no-teacher] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from t2r.bench.throughput import device_name, greedy_steps, shaped_model
from t2r.models.hf_compat import CACHE_ARG, output_cache
from t2r.teacher import teacher_view


@torch.no_grad()
def profile_decode(model, batch: int, context: int, steps: int) -> dict:
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    out = model(input_ids=ids, **{CACHE_ARG: None}, use_cache=True, logits_to_keep=1)
    cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    nxt = greedy_steps(model, nxt, cache, 3)  # warm up: first calls compile kernels and fill allocator pools
    sync()
    start = time.perf_counter()
    nxt = greedy_steps(model, nxt, cache, steps)
    sync()
    wall = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        greedy_steps(model, nxt, cache, steps)
        sync()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time_total for e in kernels) / steps / 1000
    launches = sum(e.count for e in kernels) / steps
    top_gpu = sorted(kernels, key=lambda e: -e.device_time_total)[:16]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
    top_host = sorted(host, key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "batch": batch,
        "context": context,
        "wall_ms_per_token": round(1000 * wall, 3),
        "gpu_busy_ms_per_token": round(gpu_ms, 3),
        "kernel_launches_per_token": round(launches, 1),
        "top_kernels_ms_per_token": {e.key[:70]: round(e.device_time_total / steps / 1000, 4) for e in top_gpu},
        "top_host_ops_ms_per_token": {e.key: round(e.self_cpu_time_total / steps / 1000, 4) for e in top_host},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--eager", action="store_true", help="GSA without captured decoding steps")
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = shaped_model(args.shape, device=args.device, window=args.window).eval()
    model.decode_graphs.enabled = not args.eager
    models = [("GSA" if not args.window else f"hybrid W={args.window}", model)]
    if not args.no_teacher:
        models.append(("teacher (SDPA, KV cache)", teacher_view(model)))
    rows = []
    for label, m in models:
        for batch in args.batch or [1, 16]:
            row = {"model": label, **profile_decode(m, batch, args.context, args.steps)}
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(args.device), "shape": args.shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
