"""Speed and memory benchmarks (not tests): training throughput and decoding, GSA student vs softmax teacher.

Both sides of every comparison run in the same process on the same weights: the teacher is the teacher
architecture's own transformers class (SDPA attention, its usual KV cache) built over the converted model's
tensors without copying them, so only the attention differs. Results print as a table and return as dicts.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from t2r.kernels.tuning import TRAINING_FUSIONS, TUNING, tuned
from t2r.models.hf_compat import CACHE_ARG, output_cache
from t2r.teacher import teacher_view

SHAPES = {  # real layer shapes with random weights, for machines without the checkpoint
    "mistral-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=None,
        architecture="mistral",
    ),
    "smollm2-135m": dict(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}


def shaped_model(
    shape: str, slots: int = 64, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", window: int = 0
) -> nn.Module:
    """Random weights in a real model's shapes; ``window`` > 0 makes every layer the hybrid (a sliding window of
    that many tokens mixed per token with GSA, with a sink token: the smollm2-C-hybrid recipe's layout)."""
    from t2r.models.configuration_t2r import T2R_CONFIGS
    from t2r.models.modeling_t2r import T2R_MODELS

    fields = dict(SHAPES[shape])
    hybrid = dict(gsa_window=window, gsa_window_mix_per_token=True, gsa_window_sink=True) if window else {}
    config = T2R_CONFIGS[fields.pop("architecture")](**fields, gsa_num_slots=slots, **hybrid)
    with torch.device("meta"):
        model = T2R_MODELS[type(config)](config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    model.tie_weights()
    return model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def train_throughput(
    model: nn.Module,
    batch: int,
    seq: int,
    steps: int = 5,
    warmup: int = 2,
    label: str = "GSA",
    profile: int = 0,
    graphs: bool = False,
) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) under bf16 autocast on the model's device; with
    ``profile`` that many more steps run under the profiler (t2r.bench.profile: the GPU's busy time per step, and
    its kernels by family); with ``graphs`` each step is the replay of one captured CUDA graph
    (t2r.bench.graphed), and a capture that fails leaves its error in the row instead of timings."""
    from t2r.train.losses import ce_loss_sum

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda", capturable=graphs)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def forward_backward() -> None:
        # Under capture the autocast cache's casts would live in the graph's pool past their use: off, as
        # torch.cuda.graph's notes ask (each replay casts the weights again, as an eager step does anyway).
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graphs):
            logits = model(input_ids=ids, use_cache=False).logits
            loss = ce_loss_sum(logits, ids) / (batch * (seq - 1))  # the trainer's chunked loss
        loss.backward()
        opt.step()

    def zero_grad() -> None:
        opt.zero_grad(set_to_none=True)

    def step() -> None:
        forward_backward()
        zero_grad()

    _peak_reset()
    head = {"model": label, "batch": batch, "seq": seq} | ({"graphs": True} if graphs else {})
    if graphs:
        from t2r.bench.graphed import captured_step

        try:
            step = captured_step(forward_backward, zero_grad, warmup)
        except RuntimeError as err:  # e.g. an operation that waits for the device: say which, time the others
            zero_grad()
            return head | {"graphs_error": str(err).splitlines()[0][:200] if str(err) else type(err).__name__}
    # Per timed step: how long the host took to issue it. The student's step never waits for the device; the
    # teacher's forward does once (transformers' look at the position ids for packed rows).
    issued = []
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            start = time.perf_counter()
        began = time.perf_counter()
        step()
        issued.append(time.perf_counter() - began)
    _sync()
    seconds = (time.perf_counter() - start) / steps
    row = head | {
        "step_s": round(seconds, 4),
        "tokens_per_s": round(batch * seq / seconds),
        "peak_gb": round(_peak_gb(), 2),
        # The median step's issue time: near step_s, the host is the bound (the device waits for launches).
        "host_ms": round(statistics.median(issued[warmup:]) * 1e3, 2),
    }
    if profile:
        from t2r.bench.profile import profile_steps

        try:
            row |= profile_steps(step, profile)
        except RuntimeError as err:  # the profiler's own failure: keep the timings measured above
            row["profile_error"] = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    if graphs:  # the replays leave the graph's gradients on the parameters: the next row starts from none
        torch.cuda.synchronize()
        zero_grad()
    return row


def check_graphs(device: str) -> None:
    """Before a benchmark runs: CUDA graphs need the run to be on a GPU."""
    from t2r.devices import resolve_device
    from t2r.errors import T2RError

    if torch.device(resolve_device(device)).type != "cuda":
        raise T2RError(f"--graphs captures CUDA graphs; the run is on {device!r}: give a CUDA device")


def teacher_ratios(rows: list[dict]) -> list[dict]:
    """Each row with its ratio to the teacher's row of the same sequence length (the teacher's own: 1.0): tokens/s
    (``x_teacher``) and, where profiled, GPU busy time (``gpu_x_teacher``: the ratio both would reach at their
    device time, i.e. with no host overhead)."""
    teachers = {(r["seq"], r.get("graphs", False)): r for r in rows if r["model"].startswith("teacher")}
    for row in rows:
        teacher = teachers.get((row["seq"], row.get("graphs", False)))  # graphed rows against the graphed teacher
        if teacher is None or "tokens_per_s" not in row or "tokens_per_s" not in teacher:
            continue
        row["x_teacher"] = round(row["tokens_per_s"] / teacher["tokens_per_s"], 3)
        if row.get("gpu_ms") and teacher.get("gpu_ms"):
            row["gpu_x_teacher"] = round(teacher["gpu_ms"] / row["gpu_ms"], 3)
    return rows


def greedy_steps(model: nn.Module, nxt: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """``steps`` greedy decoding steps on ``cache`` from tokens ``nxt`` [B, 1]; returns the last tokens."""
    for _ in range(steps):
        nxt = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    return nxt


@torch.no_grad()
def decode_throughput(
    model: nn.Module,
    batch: int,
    context: int,
    modes: dict[str, contextlib.AbstractContextManager] | None = None,
    new_tokens: int = 64,
    prefill_chunk: int = 4096,
) -> list[dict]:
    """Decode tokens/s after one prefill of ``context`` tokens (fed in chunks), timed under each of ``modes`` in
    turn (label -> context manager; each continues the same sequences), and peak memory from the prefill's start
    to the end of that mode's decoding."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    _peak_reset()
    cache = None
    for i in range(0, context, prefill_chunk):
        out = model(input_ids=ids[:, i : i + prefill_chunk], **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)
    rows = []
    for label, mode in (modes or {"": contextlib.nullcontext()}).items():
        with mode:
            nxt = greedy_steps(model, nxt, cache, 2)  # warm-up: first steps compile kernels (and capture graphs)
            _sync()
            start = time.perf_counter()
            nxt = greedy_steps(model, nxt, cache, new_tokens)
            _sync()
        seconds = time.perf_counter() - start
        rows.append({
            "model": label,
            "batch": batch,
            "context": context,
            "ms_per_token": round(1000 * seconds / new_tokens, 3),
            "tokens_per_s": round(batch * new_tokens / seconds),
            "peak_gb": round(_peak_gb(), 2),
        })  # fmt: skip
    return rows


@torch.no_grad()
def generate_throughput(
    model: nn.Module, batch: int, context: int, new_tokens: int, label: str, repeats: int = 3, **generate_kwargs
) -> dict:
    """Decode tokens/s through ``model.generate()`` itself: its loop, logits processing and cache handling
    included. One warm-up call (compilation and graph capture), then calls for ``new_tokens`` tokens and for a
    single token, the fastest of ``repeats`` each: the difference is the decoding, without the prefill. Peak memory
    over the timed calls."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        _sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, **generate_kwargs)  # fmt: skip
        _sync()
        return time.perf_counter() - start

    first = run(new_tokens)
    _peak_reset()
    for _ in range(3):  # a busy host can hide a short decoding in the calls' noise: measure again
        seconds = min(run(new_tokens) for _ in range(repeats)) - min(run(1) for _ in range(repeats))
        if seconds > 0:
            break
    if seconds <= 0:  # the decoding drowned in the calls' noise: no number beats a wrong one
        from t2r.errors import T2RError

        raise T2RError(f"generate({new_tokens}) took no longer than generate(1) for {label}: give more --new-tokens")
    return {
        "model": label,
        "batch": batch,
        "context": context,
        "ms_per_token": round(1000 * seconds / (new_tokens - 1), 3),
        "tokens_per_s": round(batch * (new_tokens - 1) / seconds),
        "peak_gb": round(_peak_gb(), 2),
        "first_call_s": round(first, 2),  # what a user waits for the first generate(): compilation, capture
    }


def _columns(rows: list[dict]) -> list[str]:
    """The keys of scalar values, in first-seen order (lists, such as a profile's top kernels, stay in the JSON)."""
    return list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, list | dict)))


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = _columns(rows)
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-|-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


def markdown_table(rows: list[dict]) -> str:
    keys = _columns(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def check_outputs(*paths: Path | None) -> None:
    """Before a benchmark runs (minutes on a GPU): an output path it could not write fails now, not after."""
    from t2r.errors import T2RError

    for path in paths:
        if path is not None and Path(path).is_dir():
            raise T2RError(f"{path} is a directory; give a file to write the results to")


def device_name(device: str | None) -> str:
    """What a record calls the device the benchmark ran on: the GPU's name for a CUDA device, else the CPU's (a
    `--device cpu` run on a GPU machine is a CPU measurement)."""
    import platform

    from t2r.devices import resolve_device

    if torch.device(device if device is not None else resolve_device(None)).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def write_outputs(
    rows: list[dict],
    out: Path | None,
    record: Path | None,
    command: str,
    tables: list[list[dict]] | None = None,
    notes: Sequence[str] = (),
    device: str | None = "cuda",
) -> None:
    """The rows as JSON (``out``); the run as a markdown section (``record``): notes, then tables (default: rows);
    both name the device the benchmark ran on (``device``, as passed to it)."""
    from t2r.fsutil import atomic_write_text

    device = device_name(device)
    if out is not None:
        record_json = {"date": time.strftime("%Y-%m-%d"), "device": device, "rows": rows}
        atomic_write_text(out, json.dumps(record_json, indent=2))
    if record is not None:
        record_markdown(record, command, device, tables or [rows], notes)


def record_markdown(
    path: str | Path, command: str, device: str, tables: list[list[dict]], notes: Sequence[str]
) -> None:
    """Append one section (the command, the device, the date and the tables exactly as measured) to a markdown
    log such as docs/benchmarks.md, so that recorded numbers are the run's own, not retyped."""
    from t2r.fsutil import atomic_write_text

    path = Path(path)
    old = path.read_text() if path.exists() else ""
    parts = [f"### `{command}` ({device}, {time.strftime('%Y-%m-%d')})", *notes]
    parts += [markdown_table(rows) for rows in tables if rows]
    atomic_write_text(path, old.rstrip("\n") + ("\n\n" if old.strip() else "") + "\n\n".join(parts) + "\n")


def load_bench_model(path: str | None, shape: str | None, device: str, window: int = 0) -> nn.Module:
    from t2r.devices import resolve_device
    from t2r.models.loading import load_converted

    device = resolve_device(device)

    from t2r.errors import T2RError

    if (path is None) == (shape is None):
        raise T2RError("give a converted model directory or --shape (e.g. mistral-7b), not both")
    if window and shape is None:
        raise T2RError("--window builds a hybrid with random weights: give --shape, not a model directory")
    if shape is not None:
        return shaped_model(shape, device=device, window=window)
    return load_converted(path, torch.bfloat16).to(device)


def run_train_bench(
    path, shape, seqs, batch, steps, lora, device, reference: bool = False, compile: bool = False,
    fusions: bool = False, profile: int = 0, variants: Sequence[str] = (), rounds: int = 1, graphs: bool = False,
) -> list[dict]:  # fmt: skip
    """GSA student vs teacher (SDPA) training throughput; with ``lora`` the student trains LoRA r=8 on
    q/k/v/o plus the new parameters, with gradient checkpointing (the mistral-7b-fast setting). With ``compile``
    both sides' decoder layers are compiled (t2r.train.compiled); the warmup steps then include the compilation.
    ``fusions`` also times the student with the training fusions (tuning.TRAINING_FUSIONS) switched the other
    way, in the same run: the A/B behind their default; each of ``variants`` (tunables, as
    :func:`t2r.kernels.tuning.parse_changes` reads them) times it once more with those changed. ``profile``: steps
    per row under the profiler (each row gains its GPU busy time and kernels by family; t2r.bench.profile). With
    ``rounds`` > 1 every row of a length is timed once per round, the rows taking turns (a host-bound step's time
    drifts with the machine by 10-30% between runs; turns spread that drift over every row), and each row reports
    its median round (:func:`median_rounds`; the profile runs in the last). ``graphs``: every row (the teacher's
    too) is timed again with its step captured as one CUDA graph (t2r.bench.graphed), which takes the host's time
    out. Student rows carry their ratios to the teacher in the same mode (:func:`teacher_ratios`)."""
    from t2r.bench.profile import check_profile
    from t2r.train.compiled import compile_decoder_layers

    if profile:
        check_profile(device)
    if graphs:
        check_graphs(device)
    modes = [("", False), (", graphs", True)] if graphs else [("", False)]
    changed = [(_checked_changes(text), f", {text}") for text in variants]
    prepare = compile_decoder_layers if compile else (lambda m: m)
    tag = ", compiled" if compile else ""
    model = prepare(load_bench_model(path, shape, device))
    flipped = not all(getattr(TUNING, name) for name in TRAINING_FUSIONS)
    settings = [({}, "")]
    if fusions:
        settings.append((dict.fromkeys(TRAINING_FUSIONS, flipped), f", fusions {'on' if flipped else 'off'}"))
    settings += changed
    rows = []
    for seq in seqs:
        timed, teacher = [], None
        for turn in range(rounds):

            def measure(m: nn.Module, name: str, how: str, seq: int = seq, last: bool = turn == rounds - 1) -> list:
                """Rows labelled "NAME (HOW[, graphs])", one per mode."""
                profiled = profile if last else 0
                return [
                    _progress(
                        train_throughput(
                            m, batch, seq, steps, label=f"{name} ({how}{mode})", profile=profiled, graphs=graphed
                        )
                    )
                    for mode, graphed in modes
                ]

            if lora:
                from t2r.train.recipe import LoraSettings, Stage
                from t2r.train.trainable import configure_trainable

                stage = Stage(train="lora", lora=LoraSettings(r=8, alpha=16))
                student, _ = configure_trainable(model, stage, 0)
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                for changes, label in settings:
                    with tuned(**changes):
                        timed += measure(student, "GSA + LoRA r8", f"ckpt{tag}{label}")
                model = student.unload()
            else:
                for changes, label in settings:
                    with tuned(**changes):
                        timed += measure(model, "GSA", f"full{tag}{label}")
                if device != "cpu" and reference:
                    with tuned(impl="reference"):
                        timed += measure(model, "GSA, reference path", "full")
                if teacher is None:  # built (and compiled) once per length
                    teacher = prepare(teacher_view(model))
                timed += measure(teacher, "teacher SDPA", f"full{tag}")
                model.zero_grad(set_to_none=True)
        rows += median_rounds(timed) if rounds > 1 else timed
    return teacher_ratios(rows)


def _progress(row: dict) -> dict:
    """A row on stderr as soon as it is measured (one JSON line): a run cut short by a time limit keeps the rows
    it finished, and a long one shows where it is."""
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}), file=sys.stderr, flush=True)
    return row


def median_rounds(rows: list[dict]) -> list[dict]:
    """Rows of one length timed in several rounds -> one per label, in first-seen order: the round with the median
    step time (its own tokens/s, memory and issue time; the lower middle of an even count), with the rounds'
    count, their spread ((slowest - fastest) / median step) and the profiled round's profile."""
    merged = []
    for label in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == label]
        times = sorted(r["step_s"] for r in runs if "step_s" in r)
        if not times:  # every round failed (a graph that could not be captured): its first error
            merged.append(dict(runs[0]) | {"rounds": len(runs)})
            continue
        middle = times[(len(times) - 1) // 2]
        row = dict(next(r for r in runs if r.get("step_s") == middle))
        for run in runs:  # the profile's keys, from the round that was profiled
            row |= {k: v for k, v in run.items() if k not in row}
        spread = (times[-1] - times[0]) / middle if middle else 0.0
        merged.append(row | {"rounds": len(runs), "spread": round(spread, 3)})
    return merged


def _checked_changes(text: str) -> dict:
    """A variant's tunables, parsed and checked before the benchmark runs: a typo is one line, not a traceback
    after minutes of timing."""
    from t2r.errors import T2RError
    from t2r.kernels.tuning import parse_changes

    try:
        changes = parse_changes(text)
        with tuned(**changes):
            pass
    except ValueError as err:
        raise T2RError(f"--tuning {text!r}: {err}") from None
    return changes


@contextlib.contextmanager
def _decode_graphs(model: nn.Module, enabled: bool, compile: str | None = None):
    """GSA decoding with or without its captured steps (t2r.models.decode_graphs), compiled or not; steps captured
    here are dropped on the way out."""
    graphs = model.decode_graphs
    old = graphs.enabled, graphs.compile
    graphs.enabled, graphs.compile = enabled, compile
    try:
        yield
    finally:
        graphs.enabled, graphs.compile = old
        graphs.reset()


def _sdpa_without_cudnn():
    """The teacher's SDPA with cuDNN's attention left out: on Hopper, torch picks cuDNN for the decode call, whose host
    side dominates a small model's step (docs/benchmarks.md); flash or memory-efficient attention is the stronger
    baseline there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


GSA_COMPILED, GSA_GRAPHS, GSA_EAGER = "GSA (CUDA graphs, compiled step)", "GSA (CUDA graphs)", "GSA (eager)"
TEACHER_DEFAULT, TEACHER_NO_CUDNN = "teacher SDPA (default)", "teacher SDPA (no cuDNN)"


def run_generate_bench(
    path, shape, contexts, batches, new_tokens, device, teacher: bool = True, window: int = 0, compile_step=False,
    end_to_end: bool = False,
) -> list[dict]:  # fmt: skip
    """GSA decoding (captured steps where the device has CUDA graphs, and eager) against the teacher's KV-cache
    decoding (torch's default SDPA choice, and without cuDNN), same weights, batch and context; with ``window``
    (random weights only) the hybrid: a sliding window of that many tokens mixed per token, with a sink; with
    ``compile_step`` the captured step is also timed through torch.compile (inductor). ``end_to_end`` times
    ``generate()`` itself instead (see :func:`run_end_to_end`)."""
    model = load_bench_model(path, shape, device, window).eval()
    if end_to_end:
        return run_end_to_end(model, contexts, batches, new_tokens, teacher, compile_step)
    graphs = _cuda(model)
    rows = []
    with torch.no_grad():
        for batch in batches:
            for context in contexts:
                modes = {GSA_EAGER: _decode_graphs(model, False)}
                if graphs:
                    modes = {GSA_GRAPHS: _decode_graphs(model, True), **modes}
                if graphs and compile_step:
                    modes = {GSA_COMPILED: _decode_graphs(model, True, "inductor"), **modes}
                rows += map(_progress, _with_floor(decode_throughput(model, batch, context, modes, new_tokens), model))
                if teacher:
                    rows += map(_progress, _teacher_decode(model, batch, context, new_tokens, graphs))
    return rows


def _with_floor(rows: list[dict], model: nn.Module) -> list[dict]:
    """Each row with the bytes its model's decoding step moves at least (``step_mb``, 1e6 bytes; t2r.bench.floors)."""
    from t2r.bench.floors import decode_step_bytes

    for row in rows:
        row["step_mb"] = round(decode_step_bytes(model, row["batch"], row["context"]) / 1e6, 3)
    return rows


TEACHER_STATIC = "teacher SDPA, static cache (compiled on CUDA)"


def run_end_to_end(
    model: nn.Module, contexts, batches, new_tokens: int, teacher: bool = True, compile_step: bool = False
) -> list[dict]:
    """Tokens/s through ``generate()``: GSA with its captured steps (as users get it; with ``compile_step`` also
    compiled), the teacher with its default dynamic KV cache, and with ``cache_implementation="static"``, under
    which transformers compiles the teacher's forward and replays it as CUDA graphs (on CUDA): the teacher's own
    fastest decoding path."""
    rows = []
    teacher_model = teacher_view(model) if teacher else None
    modes = {GSA_GRAPHS if _cuda(model) else GSA_EAGER: None}
    if compile_step and _cuda(model):
        modes[GSA_COMPILED] = "inductor"
    for batch in batches:
        for context in contexts:
            for label, compile in modes.items():
                with _decode_graphs(model, model.decode_graphs.enabled, compile):
                    row = generate_throughput(model, batch, context, new_tokens, label)
                    rows += map(_progress, _with_floor([row], model))
            if teacher_model is None:
                continue
            for label, kwargs in ((TEACHER_DEFAULT, {}), (TEACHER_STATIC, {"cache_implementation": "static"})):
                try:
                    row = generate_throughput(teacher_model, batch, context, new_tokens, label, **kwargs)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = {"model": label, "batch": batch, "context": context, "tokens_per_s": "OOM"}
                rows += map(_progress, _with_floor([row], teacher_model))
    return rows


def _cuda(model: nn.Module) -> bool:
    return next(model.parameters()).is_cuda


def _teacher_decode(model: nn.Module, batch: int, context: int, new_tokens: int, cuda: bool) -> list[dict]:
    modes = {TEACHER_DEFAULT: contextlib.nullcontext()}
    if cuda:
        modes[TEACHER_NO_CUDNN] = _sdpa_without_cudnn()
    teacher = teacher_view(model)
    try:
        rows = decode_throughput(teacher, batch, context, modes, new_tokens)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        rows = [{"model": label, "batch": batch, "context": context, "tokens_per_s": "OOM"} for label in modes]
    return _with_floor(rows, teacher)


def decode_ratios(rows: list[dict]) -> list[dict]:
    """Per batch and context: GSA's tokens/s (its fastest mode measured: compiled captured steps, captured steps,
    eager) over the faster teacher's, and the ratio of their steps' bytes (``bytes ratio``: the speed-up if both
    decoded at their memory floor; a measured ratio above it comes from the teacher's other costs, e.g. its host)."""
    out = []
    cells = dict.fromkeys((r["batch"], r["context"]) for r in rows)
    for batch, context in cells:
        cell = {r["model"]: r.get("tokens_per_s") for r in rows if (r["batch"], r["context"]) == (batch, context)}
        modes = {k: cell[k] for k in (GSA_COMPILED, GSA_GRAPHS, GSA_EAGER) if isinstance(cell.get(k), (int, float))}
        best = max(modes, key=modes.__getitem__) if modes else None
        gsa = modes.get(best)
        teachers = [v for k, v in cell.items() if k.startswith("teacher") and isinstance(v, (int, float))]
        row = {"batch": batch, "context": context, "GSA tokens/s": gsa, "GSA mode": best}
        if teachers and gsa:
            row["best teacher tokens/s"] = max(teachers)
            row["GSA / best teacher"] = f"{gsa / max(teachers):.2f}x"
        elif not teachers and any(k.startswith("teacher") for k in cell):
            row["GSA / best teacher"] = "teacher OOM"
        step_mb = {r["model"].startswith("teacher"): r["step_mb"] for r in rows
                   if (r["batch"], r["context"]) == (batch, context) and "step_mb" in r}  # fmt: skip
        if len(step_mb) == 2:
            row["bytes ratio"] = f"{step_mb[True] / step_mb[False]:.2f}x"
        if cell.get(GSA_GRAPHS) and cell.get(GSA_EAGER):
            row["graphs / eager"] = f"{cell[GSA_GRAPHS] / cell[GSA_EAGER]:.2f}x"
        out.append(row)
    return out
