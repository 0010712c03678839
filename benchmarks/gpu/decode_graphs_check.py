"""Captured decoding steps on a GPU: agreement with eager decoding, then where a replayed step's time goes.

For each model (random weights in SmolLM2-135M's shapes, bf16; pure GSA and the W=512 hybrid):
1. greedy generate() over a left-padded batch with CUDA graphs on and off: the tokens must be identical and the
   logits' relative error within bf16 noise (a replay runs the same kernels as eager decoding);
2. hand decoding after a 2k prefill: logits of each step, graphs vs eager (relative error);
3. time: a step's wall time through forward() (graphs, eager), the replay alone (GPU time by CUDA events, which is
   the floor the graph leaves), and generate() end to end (tokens/s with and without graphs).

Then the same step compiled with torch.compile (inductor) inside the graph: compilation time, agreement, step times.
And the fused decode step (one Triton launch per layer that also applies the feature maps, gates and the output's
silu) against the unfused PyTorch reference path (T2R_GSA_IMPL=reference), both in bf16 and against fp32.

Usage: python benchmarks/gpu/decode_graphs_check.py [--compile-only | --fused-only | --no-compiled] [--no-times]
                                                   [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from t2r.bench.throughput import shaped_model
from t2r.models.hf_compat import CACHE_ARG, output_cache


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def decode(model, ids, steps: int, forced: torch.Tensor | None = None):
    """Logits of ``steps`` decoding steps after a prefill of ``ids``: greedy, or fed ``forced``'s tokens (so that two
    implementations are compared on the same inputs even where their argmax differs)."""
    out = model(input_ids=ids, **{CACHE_ARG: None}, use_cache=True, logits_to_keep=1)
    cache, nxt, logits = output_cache(out), out.logits[:, -1:].argmax(-1), []
    for i in range(steps):
        step = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1]
        logits.append(step.float())
        nxt = step[:, None].argmax(-1) if forced is None else forced[:, i : i + 1]
    return torch.stack(logits, 1), cache


@torch.no_grad()
def step_times(model, batch: int, context: int, steps: int = 64) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    row = {"batch": batch, "context": context}
    for label, enabled in (("graphs", True), ("eager", False)):
        model.decode_graphs.enabled = enabled
        _, cache = decode(model, ids, 2)
        nxt = ids[:, :1]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        row[f"{label}_ms_per_token"] = round(1000 * (time.perf_counter() - start) / steps, 3)
    model.decode_graphs.enabled = True
    step = next(iter(model.decode_graphs.steps.values()))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step.graph.replay()
    end.record()
    torch.cuda.synchronize()
    row["replay_gpu_ms_per_token"] = round(begin.elapsed_time(end) / steps, 3)
    model.decode_graphs.reset()
    return row


@torch.no_grad()
def check(label: str, model, times: bool = True) -> dict:
    result = {"model": label}
    # 1. generate() over a left-padded batch.
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37], mask[3, :250] = 0, 0
    runs = {}
    for name, enabled in (("graphs", True), ("eager", False)):
        model.decode_graphs.enabled = enabled
        kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        runs[name] = model.generate(ids, **kw)
        torch.cuda.synchronize()
    result["generate_tokens_identical"] = bool(torch.equal(runs["graphs"].sequences, runs["eager"].sequences))
    result["generate_logits_rel_err"] = rel_err(torch.stack(runs["graphs"].logits), torch.stack(runs["eager"].logits))
    # 2. hand decoding after a 2k prefill.
    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device="cuda")
    model.decode_graphs.enabled = True
    graphed, _ = decode(model, ids, 48)
    result["captured_steps"] = len(model.decode_graphs.steps)
    result["capture_failures"] = list(model.decode_graphs.failed.values())
    model.decode_graphs.enabled = False
    eager, _ = decode(model, ids, 48)
    result["decode_logits_rel_err"] = rel_err(graphed, eager)
    model.decode_graphs.enabled = True
    model.decode_graphs.reset()
    # 3. times.
    if not times:
        print(json.dumps(result, indent=1), flush=True)
        return result
    result["steps"] = [step_times(model, b, 2048) for b in (1, 16, 64)]
    for name, enabled in (("graphs", True), ("eager", False)):
        model.decode_graphs.enabled = enabled
        ids = torch.randint(0, model.config.vocab_size, (16, 1024), device="cuda")
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=256, min_new_tokens=256, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        result[f"generate_16x1k_256_new_s_{name}"] = round(time.perf_counter() - start, 3)
    model.decode_graphs.enabled = True
    print(json.dumps(result, indent=1), flush=True)
    return result


@torch.no_grad()
def compiled(label: str, model, reference, backend: str = "inductor", times: bool = True) -> dict:
    """The captured step through torch.compile: capture time (compilation included), agreement with eager bf16
    decoding and, for both, the error against fp32 eager decoding (``reference``: the same weights in fp32); step
    times."""
    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device="cuda")
    forced = torch.randint(0, model.config.vocab_size, (8, 48), device="cuda")  # the same tokens for all
    reference.decode_graphs.enabled = model.decode_graphs.enabled = False
    exact, _ = decode(reference, ids, 48, forced)
    eager, _ = decode(model, ids, 48, forced)
    model.decode_graphs.enabled, model.decode_graphs.compile = True, backend
    torch.cuda.synchronize()
    start = time.perf_counter()
    got, _ = decode(model, ids, 48, forced)
    torch.cuda.synchronize()
    seconds = round(time.perf_counter() - start, 2)
    result = {"model": f"{label}, step compiled ({backend})", "first_decode_48_s": seconds}
    result["capture_failures"] = list(model.decode_graphs.failed.values())
    result["decode_logits_rel_err"] = rel_err(got, eager)
    result["decode_argmax_agreement"] = (got.argmax(-1) == eager.argmax(-1)).float().mean().item()
    result["eager_bf16_rel_err_vs_fp32"] = rel_err(eager, exact)
    result["compiled_bf16_rel_err_vs_fp32"] = rel_err(got, exact)
    model.decode_graphs.reset()
    if times:
        result["steps"] = [step_times(model, b, 2048) for b in (1, 16, 64)]
    model.decode_graphs.compile = None
    print(json.dumps(result, indent=1), flush=True)
    return result


@torch.no_grad()
def fused(label: str, model, reference) -> dict:
    """Eager decoding through the fused step vs the PyTorch reference path (unfused prologue, recurrent step) on
    the same forced tokens, in bf16 and fp32 (``reference``: the same weights in fp32), each against fp32 reference
    decoding."""
    from t2r.kernels.tuning import tuned

    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device="cuda")
    forced = torch.randint(0, model.config.vocab_size, (8, 48), device="cuda")
    model.decode_graphs.enabled = reference.decode_graphs.enabled = False
    runs = {}
    for impl in ("reference", "auto"):
        with tuned(impl=impl):
            runs[f"{impl}_fp32"], _ = decode(reference, ids, 48, forced)
            runs[f"{impl}_bf16"], _ = decode(model, ids, 48, forced)
    model.decode_graphs.enabled = reference.decode_graphs.enabled = True
    exact = runs["reference_fp32"]
    result = {"model": f"{label}, fused decode step vs the reference path"}
    result["fused_fp32_rel_err_vs_reference_fp32"] = rel_err(runs["auto_fp32"], exact)
    result["fused_bf16_rel_err_vs_reference_fp32"] = rel_err(runs["auto_bf16"], exact)
    result["reference_bf16_rel_err_vs_reference_fp32"] = rel_err(runs["reference_bf16"], exact)
    result["fused_bf16_rel_err_vs_reference_bf16"] = rel_err(runs["auto_bf16"], runs["reference_bf16"])
    result["capture_failures"] = []
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--compile-only", action="store_true", help="only the compiled-step variants")
    ap.add_argument("--no-times", action="store_true", help="agreement only")
    ap.add_argument("--fused-only", action="store_true", help="only the fused step against the reference path")
    ap.add_argument("--no-compiled", action="store_true", help="leave out the compiled-step variants")
    args = ap.parse_args()
    gsa32 = shaped_model("smollm2-135m", dtype=torch.float32).eval()
    hybrid32 = shaped_model("smollm2-135m", dtype=torch.float32, window=512).eval()
    gsa, hybrid = (copy.deepcopy(m).to(torch.bfloat16) for m in (gsa32, hybrid32))  # the same weights in bf16
    results = [fused("GSA", gsa, gsa32), fused("hybrid W=512", hybrid, hybrid32)]
    times = not args.no_times
    if not args.compile_only and not args.fused_only:
        results += [
            check("GSA (smollm2-135m shapes)", gsa, times),
            check("hybrid W=512 (smollm2-135m shapes)", hybrid, times),
        ]
    if not args.fused_only and not args.no_compiled:
        results += [compiled("GSA", gsa, gsa32, times=times), compiled("hybrid W=512", hybrid, hybrid32, times=times)]
    ok = all(
        r.get("generate_tokens_identical", True)
        and not r["capture_failures"]
        and (
            r.get("decode_logits_rel_err", 1) < 1e-2  # graphs: the same kernels as eager
            or r.get("compiled_bf16_rel_err_vs_fp32", 1) <= 1.5 * r.get("eager_bf16_rel_err_vs_fp32", 0)
            or (  # fused: within the fp32 tolerance of the reference, and no less accurate in bf16
                r.get("fused_fp32_rel_err_vs_reference_fp32", 1) <= 1e-2
                and r["fused_bf16_rel_err_vs_reference_fp32"] <= 1.1 * r["reference_bf16_rel_err_vs_reference_fp32"]
            )
        )
        for r in results
    )
    print("PASS" if ok else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
