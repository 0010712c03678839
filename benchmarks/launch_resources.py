"""Registers and spills of the kernels one real training step launches, with the launch settings the host code
picks at that shape, compiled for sm_90 on a machine without a GPU.

kernel_resources.py compiles every kernel at one fixed set of block sizes (the kernels issue's K = V = 128). The
host code picks block sizes, warps and stages per shape (a small model's 64-wide heads, few KV heads, long
sequences), so the programs that run differ. Here a model in a real shape (random weights) takes one forward and
backward on the CPU under bf16 autocast with Triton's interpreter, every launch recorded and skipped (so it costs
seconds even at 16k tokens). Each distinct launch (kernel, argument types, constexprs, warps, stages) is then
compiled for sm_90 and reported with how often the step launches it. A kernel with STACK > 0 spills.

Each compile is timed, in an empty Triton cache: their sum is what a fresh machine's first step spends compiling
our kernels (on this machine's CPU; a GPU host compiles the same programs). That is most of the cold start, and
it grows with every kernel variant a default turns on.

Usage: python benchmarks/launch_resources.py [--shape smollm2-135m] [--seq 16384] [--batch 1] [--layers 1]
       [--tuning NAME=VALUE ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
          torch.int64: "*i64", torch.bool: "*i1"}  # fmt: skip


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"an argument of type {type(value).__name__}")


def record_step(shape: str, seq: int, batch: int, layers: int) -> Counter:
    """Launches of one training step: (kernel name, its file, ((arg, type), ...), ((constexpr, value), ...),
    warps, stages) -> count. Needs TRITON_INTERPRET=1 from the process's start (Triton's own library is defined
    for the interpreter or the compiler, not both), so it runs in a child process (``--record``)."""
    import inspect

    import triton.runtime.interpreter as interpreter

    from t2r.bench.throughput import SHAPES, shaped_model
    from t2r.kernels import chunk
    from t2r.train.losses import ce_loss_sum

    launches: Counter = Counter()

    def record(self, *args, grid, warmup, **kwargs):
        warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
        kwargs.pop("launch_pdl", None)  # a launch attribute (kernels/pdl.py), not an argument
        signature = inspect.signature(self.fn)
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        bound, params = call.arguments, signature.parameters
        consts = tuple((n, v) for n, v in bound.items() if "constexpr" in str(params[n].annotation))
        types = tuple((n, _arg_type(v)) for n, v in bound.items() if "constexpr" not in str(params[n].annotation))
        launches[(self.fn.__name__, inspect.getsourcefile(self.fn), types, consts, warps, stages)] += 1

    interpreter.InterpretedFunction.run = record
    chunk.INTERPRETED = False  # the precisions a GPU gets (the interpreter's are emulated fp32)
    chunk._precision.cache_clear()
    fields = dict(SHAPES[shape], num_hidden_layers=layers)
    SHAPES[f"{shape}/probe"] = fields
    model = shaped_model(f"{shape}/probe", device="cpu", dtype=torch.float32)
    ids = torch.randint(0, fields["vocab_size"], (batch, seq))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
    loss.backward()
    return launches


def compile_launches(launches: Counter) -> list[dict]:
    """Each distinct launch compiled for sm_90 (timed, in an empty Triton cache): its registers, stack (spills) and
    shared memory."""
    from kernel_resources import compile_sm90, load_kernels, resources_of

    modules: dict[str, object] = {}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        for (name, path, types, consts, warps, stages), count in sorted(launches.items(), key=lambda x: x[0][0]):
            module = modules.setdefault(path, load_kernels(path))
            fn, seconds = getattr(module, name), None
            try:
                began = time.perf_counter()
                compiled = compile_sm90(fn, dict(types), dict(consts), warps, stages)
                seconds = round(time.perf_counter() - began, 2)
                report = resources_of(fn, dict(types), dict(consts), warps, stages, compiled)
            except Exception as err:  # one that does not build here: say so, go on with the others
                report = f"not compiled here: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]}"
            shown = {n: v for n, v in consts if isinstance(v, int) and not isinstance(v, bool)}
            rows.append({"kernel": name, "launches": count, "warps": warps, "stages": stages, "resources": report,
                         "compile_s": seconds, "constexprs": shown})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (each launches the same kernels)")
    parser.add_argument("--tuning", action="append", default=[], help="a kernel tunable changed, NAME=VALUE")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # the child process: launches to this file
    args = parser.parse_args()
    if args.record:
        from t2r.kernels.tuning import parse_changes, tuned

        with tuned(**{k: v for text in args.tuning for k, v in parse_changes(text).items()}):
            launches = record_step(args.shape, args.seq, args.batch, args.layers)
        args.record.write_text(json.dumps([[list(key), n] for key, n in launches.items()]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        # CPU tensors to the kernels, which the interpreter then records instead of running
        env = dict(os.environ, TRITON_INTERPRET="1", T2R_GSA_IMPL="triton")
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--record", str(path)], env=env, check=True)
        recorded = json.loads(path.read_text())
    launches = Counter({(name, file, tuple(map(tuple, types)), tuple(map(tuple, consts)), warps, stages): n
                        for (name, file, types, consts, warps, stages), n in recorded})  # fmt: skip
    rows = compile_launches(launches)
    print(f"{args.shape}, {args.batch} x {args.seq}, {args.layers} layer(s), sm_90 offline; tuning: {args.tuning}")
    # Each distinct launch is one compile on a fresh machine: what the first step's cold start pays for.
    total = sum(r["compile_s"] or 0.0 for r in rows)
    print(f"{len(rows)} distinct programs, {sum(r['launches'] for r in rows)} launches per step, "
          f"{total:.1f} s of compiling on this CPU")  # fmt: skip
    for row in rows:
        blocks = " ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        print(f"{row['kernel']:28s} x{row['launches']:<3d} warps {row['warps']} stages {row['stages']}: "
              f"{row['resources']}  {row['compile_s']} s  [{blocks}]")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
