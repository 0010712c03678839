"""Cold start: seconds from a fresh process with empty Triton and Inductor caches to the first training step and to
the first decoded token (kernel compilation, torch.compile and graph capture included), and what the second costs.

Each mode runs in its own subprocess whose caches point at new empty folders, as on a fresh machine.
Usage: python benchmarks/cold_start.py [--shape smollm2-135m] [--batch 8] [--seq 2048] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(mode: str, shape: str, batch: int, seq: int) -> dict:
    start = time.perf_counter()
    import torch

    from t2r.bench.throughput import shaped_model
    from t2r.models.hf_compat import CACHE_ARG, output_cache
    from t2r.train.compiled import compile_decoder_layers
    from t2r.train.losses import ce_loss_sum

    model = shaped_model(shape, dtype=torch.float32)
    row = {"mode": mode, "shape": shape, "import_and_build_s": round(time.perf_counter() - start, 2)}
    if mode == "decode":
        model = model.to(torch.bfloat16).eval()
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
        marks = []
        with torch.no_grad():
            out = model(input_ids=ids, **{CACHE_ARG: None}, use_cache=True, logits_to_keep=1)
            cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            for _ in range(2):
                nxt = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                marks.append(time.perf_counter())
        row["first_prefill_s"] = round(marks[0] - start - row["import_and_build_s"], 2)
        row["first_token_s"] = round(marks[1] - marks[0], 2)
        row["second_token_s"] = round(marks[2] - marks[1], 4)
    else:
        if mode == "train-compiled":
            compile_decoder_layers(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
        marks = [time.perf_counter()]
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = ce_loss_sum(model(input_ids=ids, use_cache=False).logits, ids) / ids.numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
        row["first_step_s"] = round(marks[1] - marks[0], 2)
        row["second_step_s"] = round(marks[2] - marks[1], 3)
    row["total_to_first_s"] = round(marks[1] - start, 2)  # process start to the first step's (or token's) end
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mode", action="append", help="train, train-compiled, decode (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.batch, args.seq)))
        return
    rows = []
    for mode in args.mode or ["train", "train-compiled", "decode"]:
        with tempfile.TemporaryDirectory() as triton, tempfile.TemporaryDirectory() as inductor:
            env = {**os.environ, "TRITON_CACHE_DIR": triton, "TORCHINDUCTOR_CACHE_DIR": inductor}
            cmd = [sys.executable, __file__, "--child", mode, "--shape", args.shape, "--batch", str(args.batch),
                   "--seq", str(args.seq)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            rows.append({"mode": mode, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
