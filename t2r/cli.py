"""The ``t2r`` command (installed as ``t2r.cli``): a thin typer shell over the library functions."""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Turn pretrained Transformer LLMs into linear-time Gated Slot Attention RNNs.",
)


@app.callback()
def _root() -> None:
    """Turn pretrained Transformer LLMs into linear-time Gated Slot Attention RNNs."""


@app.command()
def version() -> None:
    """Print the t2r version."""
    from t2r import __version__

    typer.echo(__version__)


def _option_params(cls: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """typer parameters for every command-line field of dataclass ``cls`` (help, flag and default from the field's
    declaration: the one place an option is written down)."""
    import dataclasses

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False) or f.name in skip:
            continue
        kind = meta.get("cli_type") or hints[f.name]
        decls = (meta["flag"],) if meta.get("flag") else ()
        default = f.default if f.default is not dataclasses.MISSING else None  # factories: the class fills them
        text = meta["help"]
        if f.default_factory is not dataclasses.MISSING and f.default_factory():
            text += f" [default: {', '.join(str(x) for x in f.default_factory())}]"
        option = typer.Option(*decls, help=text, show_default=default not in (None, ""))
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
            )
        )
    return params


def _command_with_options(fn, *option_classes: type):
    """``fn(**kwargs)`` as a typer command whose signature is its own parameters plus the classes' options."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    extra = [p for cls in option_classes for p in _option_params(cls)]
    fn.__signature__ = inspect.Signature([*own, *extra])
    fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}
    return fn


def convert(
    src: Annotated[str, typer.Argument(help="alias (e.g. smollm2-135m, mistral-7b), HF directory, hub id or .gguf")],
    out: Annotated[Path, typer.Argument(help="output directory (written atomically)")],
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    allow_download: Annotated[bool, typer.Option(help="fetch hub ids missing from the local HF cache")] = False,
    **options,
) -> None:
    """Convert a pretrained Transformer checkpoint into a GSA checkpoint (streamed, shard by shard)."""
    from t2r.convert.converter import convert as run_convert
    from t2r.convert.options import ConvertOptions, parse_full_attention

    options["full_attention_layers"], options["full_attention_auto"] = parse_full_attention(
        options["full_attention_layers"]
    )
    path = run_convert(src, out, ConvertOptions(**options), force=force, allow_download=allow_download)
    typer.echo(f"converted {src} -> {path}")


@app.command()
def finetune(
    model_dir: Annotated[str, typer.Argument(help="a converted model directory (t2r convert)")],
    out: Annotated[Path, typer.Argument(help="run directory (checkpoints, logs, stage outputs)")],
    data: Annotated[list[str], typer.Option(help="training data: files, globs, dirs; repeat or comma-separate")],
    recipe: Annotated[
        str | None, typer.Option(help="recipe: a YAML file, or a shipped recipe's name (e.g. smollm2-135m)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="recipe override key=value, e.g. stages.0.steps=50")
    ] = None,
    eval_data: Annotated[list[str] | None, typer.Option(help="held-out data (default: a hash split of --data)")] = None,
    report_to: Annotated[
        str | None, typer.Option(help="also log to tensorboard and/or wandb (comma-separated; the recipe's report_to)")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run in OUT (same arguments as it was started with)")
    ] = False,
    stop_after: Annotated[int | None, typer.Option(help="checkpoint and stop after this global step", min=1)] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
) -> None:
    """Finetune a converted model: attention transfer, LM and KD stages; new, LoRA or full parameters.

    Runs unchanged under torchrun --nproc_per_node N (DDP, or FSDP2 with --set distributed=fsdp).
    """
    from t2r.train.trainer import finetune as run_finetune

    overrides = list(set_ or [])
    if report_to:
        overrides.append(f"report_to=[{', '.join(['jsonl', *report_to.split(',')])}]")
    path = run_finetune(model_dir, out, data, recipe, overrides, eval_data, resume, stop_after, device)
    typer.echo(f"run directory: {path}")


@app.command()
def resume(
    run: Annotated[Path, typer.Argument(help="a run directory (t2r finetune)")],
    stop_after: Annotated[int | None, typer.Option(help="checkpoint and stop after this global step", min=1)] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
) -> None:
    """Continue a finetuning run exactly as it was started (its recorded model, data and recipe)."""
    from t2r.train.trainer import resume_run

    typer.echo(f"run directory: {resume_run(run, stop_after, device)}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a finetuning run directory, or a converted model directory")],
    dest: Annotated[Path, typer.Argument(help="output directory (written atomically)")],
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32")] = "bf16",
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors shard")] = "5GB",
    adapter_only: Annotated[bool, typer.Option(help="write the last stage's peft adapter instead")] = False,
    skip_check: Annotated[bool, typer.Option(help="skip the decode parity check (the model card says so)")] = False,
    fmt: Annotated[str, typer.Option("--format", help="t2r, or fla: also an FLA-loadable copy in DEST/fla")] = "t2r",
    force: Annotated[bool, typer.Option(help="replace DEST if it exists")] = False,
) -> None:
    """Export a self-contained checkpoint (LoRA merged), parity-checked against step-by-step decoding."""
    from t2r.export.exporter import export as run_export

    path = run_export(
        run,
        dest,
        dtype=dtype,
        max_shard_size=max_shard_size,
        adapter_only=adapter_only,
        skip_check=skip_check,
        force=force,
        fmt=fmt,
    )
    typer.echo(f"exported {run} -> {path}")


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="exported or converted model directory, or a run directory")],
    prompt: Annotated[list[str], typer.Option(help="prompt text; repeat for a left-padded batch")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate per prompt")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    stream: Annotated[bool, typer.Option(help="print tokens as they are generated")] = False,
    chat: Annotated[bool, typer.Option(help="wrap prompts in the tokenizer's chat template")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default fp32)")] = None,
) -> None:
    """Generate text with transformers' generate() and the constant-size GSA cache."""
    from t2r.generate import check_generation, load_for_generation
    from t2r.generate import generate as run_generate

    check_generation(prompt, max_new_tokens, temperature, top_p, stream)  # before the model loads
    lm, tokenizer = load_for_generation(model, device, dtype)
    outputs = run_generate(lm, tokenizer, prompt, max_new_tokens, temperature, top_p, seed, stream, chat)
    if not stream:
        for p, text in zip(prompt, outputs, strict=True):
            typer.echo(f"{p}{text}" if len(prompt) == 1 else f"--- {p}\n{text}")


def eval_(
    model: Annotated[Path, typer.Argument(help="exported or converted model, or a run directory")],
    **options,
) -> None:
    """Perplexity by position and passkey retrieval (1k/2k/4k), and the standard zero-shot tasks (--tasks), the
    teacher beside the student."""
    import json

    from t2r.eval.options import EvalOptions
    from t2r.eval.runner import evaluate, format_table
    from t2r.fsutil import atomic_write_text

    opts = EvalOptions(**{k: v for k, v in options.items() if v is not None})
    result = evaluate(model, opts)
    typer.echo(format_table(result))
    if opts.plot and result.get("zeroshot"):
        from t2r.eval.zeroshot import plot_recovery

        typer.echo(f"recovery plot: {plot_recovery(result['zeroshot'], Path(opts.plot))}")
    if opts.json_out is not None:
        atomic_write_text(opts.json_out, json.dumps(result, indent=2) + "\n")


def _register_options_commands() -> None:
    from t2r.convert.options import ConvertOptions
    from t2r.eval.options import EvalOptions

    app.command()(_command_with_options(convert, ConvertOptions))
    app.command("eval")(_command_with_options(eval_, EvalOptions))


_register_options_commands()


bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks (ratios measured in one run).")
app.add_typer(bench_app, name="bench")


RECORD_HELP = "append the command, device, date and tables to this markdown file (e.g. docs/benchmarks.md)"


def _command() -> str:
    import shlex

    return shlex.join(["t2r", *sys.argv[1:]])


@bench_app.command("train")
def bench_train(
    model: Annotated[str | None, typer.Argument(help="converted model directory")] = None,
    shape: Annotated[str | None, typer.Option(help="random weights with real shapes: mistral-7b, smollm2-135m")] = None,
    seq: Annotated[list[int] | None, typer.Option(help="sequence lengths (repeat)")] = None,
    batch: Annotated[int, typer.Option(help="rows per step")] = 8,
    steps: Annotated[int, typer.Option(help="timed steps")] = 5,
    lora: Annotated[bool, typer.Option(help="LoRA r=8 + new params, gradient checkpointing")] = False,
    reference: Annotated[bool, typer.Option(help="also time the PyTorch reference GSA path")] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile both models' decoder layers")] = False,
    fusions: Annotated[
        bool, typer.Option(help="also time GSA with the training fusions (norms, prologue, MLP, merged GEMMs) switched")
    ] = False,
    tuning: Annotated[
        list[str] | None,
        typer.Option(help="also time GSA with these kernel tunables changed, e.g. save_states=1,save_probs=1 (repeat)"),
    ] = None,
    profile: Annotated[
        int, typer.Option(help="profile this many more steps per row: GPU busy time, kernels by family", min=0)
    ] = 0,
    rounds: Annotated[
        int, typer.Option(help="time every row this many times, the rows taking turns; report each row's median", min=1)
    ] = 1,
    graphs: Annotated[
        bool, typer.Option(help="also time every row (the teacher's too) with its step replayed as one CUDA graph")
    ] = False,
    device: Annotated[str, typer.Option(help="device")] = "cuda",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
    record: Annotated[Path | None, typer.Option(help=RECORD_HELP)] = None,
) -> None:
    """Training tokens/s and peak memory: GSA student (kernels, optionally the reference path) vs the teacher
    with SDPA, same batch, and the student's ratios to the teacher."""
    from t2r.bench.throughput import check_outputs, print_table, run_train_bench, write_outputs

    check_outputs(json_out, record)
    rows = run_train_bench(
        model, shape, seq or [2048, 4096], batch, steps, lora, device, reference, compile, fusions, profile,
        tuning or (), rounds, graphs,
    )  # fmt: skip
    print_table(rows)
    write_outputs(rows, json_out, record, _command(), device=device)


@bench_app.command("generate")
def bench_generate(
    model: Annotated[str | None, typer.Argument(help="converted or exported model directory")] = None,
    shape: Annotated[str | None, typer.Option(help="random weights with real shapes: mistral-7b, smollm2-135m")] = None,
    context: Annotated[list[int] | None, typer.Option(help="context lengths (repeat)")] = None,
    batch: Annotated[list[int] | None, typer.Option(help="batch sizes (repeat)")] = None,
    new_tokens: Annotated[int, typer.Option(help="decoded tokens timed", min=1)] = 64,
    window: Annotated[int, typer.Option(help="with --shape: the hybrid, a sliding window of N tokens", min=0)] = 0,
    teacher: Annotated[bool, typer.Option(help="also time the teacher's KV-cache decoding")] = True,
    compile_step: Annotated[bool, typer.Option(help="also time the captured step compiled (torch.compile)")] = False,
    end_to_end: Annotated[
        bool, typer.Option(help="time generate() itself; the teacher also with its static cache, compiled")
    ] = False,
    device: Annotated[str, typer.Option(help="device")] = "cuda",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
    record: Annotated[Path | None, typer.Option(help=RECORD_HELP)] = None,
) -> None:
    """Decode tokens/s and peak memory vs the teacher's KV cache at growing contexts: GSA with captured decoding
    steps (CUDA graphs) and eager, the teacher with torch's default SDPA and without cuDNN; ratios to the faster
    teacher."""
    from t2r.bench.throughput import check_outputs, decode_ratios, print_table, run_generate_bench, write_outputs

    check_outputs(json_out, record)
    contexts, batches = context or [1024, 4096, 16384, 32768], batch or [1, 16]
    if end_to_end and new_tokens < 2:
        from t2r.errors import T2RError

        raise T2RError("--end-to-end times decoding as generate(N) minus generate(1): give --new-tokens of at least 2")
    rows = run_generate_bench(
        model, shape, contexts, batches, new_tokens, device, teacher, window, compile_step, end_to_end
    )
    ratios = decode_ratios(rows)
    print_table(rows)
    print()
    print_table(ratios)
    write_outputs(rows, json_out, record, _command(), tables=[rows, ratios], device=device)


@bench_app.command("kernels")
def bench_kernels(
    fla: Annotated[bool, typer.Option(help="compare with flash-linear-attention if it is installed")] = True,
    shape: Annotated[list[str] | None, typer.Option(help="BxT training shapes (repeat); default: 4 shapes")] = None,
    train: Annotated[bool, typer.Option(help="time the training kernels (--no-train: the decode step only)")] = True,
    decode_batch: Annotated[
        list[int] | None, typer.Option(help="batch sizes of the decode step (repeat); default: 1, 16, 64", min=1)
    ] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option(help="layer shapes (repeat): issue (32 heads of 128, no GQA; default), smollm2-135m, mistral-7b"),
    ] = None,
    loss: Annotated[
        bool, typer.Option(help="time the training loss: the chunked PyTorch cross-entropy vs the fused kernels")
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None,
    record: Annotated[Path | None, typer.Option(help=RECORD_HELP)] = None,
) -> None:
    """GSA kernels vs FLA chunk_gsa (if installed) vs SDPA flash attention, fwd and fwd+bwd; the decode step
    vs FLA's fused recurrent step and KV-cache attention at 32k; the training loss, chunked vs fused; with each
    one's ratio to the memory floor."""
    from t2r.bench import kernels
    from t2r.bench.kernels import LAYERS, LOSS_SHAPES, TRAIN_SHAPES, run_kernel_bench
    from t2r.bench.throughput import check_outputs, print_table, write_outputs

    check_outputs(json_out, record)
    unknown = sorted(set(layer or ()) - set(LAYERS))
    if unknown:
        from t2r.errors import T2RError

        raise T2RError(f"--layer {unknown[0]}: expected one of {', '.join(LAYERS)}")
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in shape] if shape else None
    result = run_kernel_bench(
        (shapes or TRAIN_SHAPES) if train else [], fla, decode_batch or [1, 16, 64], layer or ["issue"],
        LOSS_SHAPES if loss else [],
    )  # fmt: skip
    bandwidth = result["copy_bandwidth_TBps"]
    notes = [
        f"{result['device']}, copy bandwidth {bandwidth} TB/s (read + write), FLA: {result['fla']}",
        f"relative error vs the PyTorch reference (bf16 inputs, GQA 2): {result['rel_error_vs_reference']}",
        f"... at 16k tokens (4 heads): {result['rel_error_vs_reference_16k']}",
        "ours_keep: T2R_GSA_SAVE_STATES=1 T2R_GSA_SAVE_PROBS=1 (the backward reuses the forward's segment states and"
        " slot softmax); *_kept_gb: device memory a forward holds for its backward beyond its inputs and output",
    ]
    print("\n".join(notes))
    print_table(result["train"])
    print()
    print_table(result["decode"])
    if result["loss"]:
        print()
        print_table(result["loss"])
    errors = {k: result[k] for k in ("rel_error_vs_reference", "rel_error_vs_reference_16k")}
    tables = [table for table in (result["train"], result["decode"], result["loss"]) if table]
    rows = [errors, *result["train"], *result["decode"], *result["loss"]]
    write_outputs(rows, json_out, record, _command(), tables, notes, device=kernels.DEVICE)


def main() -> None:
    """Run the CLI. A user error (bad input, a bad option) is one line on stderr and a non-zero exit: 1 for
    errors t2r finds, 2 for options the command line cannot parse. SIGTERM unwinds like Ctrl-C, so temporary
    files are removed on the way out."""
    from t2r.errors import T2RError
    from t2r.fsutil import exit_on_signals

    # typer >= 0.24 carries its own copy of click: take the exception classes from what it raises.
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    exit_on_signals()
    try:
        code = app(standalone_mode=False)
    except T2RError as e:
        print(f"t2r: error: {e}", file=sys.stderr)
        sys.exit(1)
    except click_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare command: its help, as click does standalone
            print(e.format_message())
        else:
            where = f" ({e.ctx.command_path})" if getattr(e, "ctx", None) is not None else ""
            print(f"t2r: error{where}: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("t2r: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
