"""RUN (or a converted directory) -> a self-contained, parity-checked checkpoint directory.

The exported directory loads with ``AutoModelForCausalLM.from_pretrained`` after ``import t2r`` and with
``trust_remote_code=True`` where t2r is not installed. Before it is published, it is loaded back from disk and
its parallel forward is compared with prefill + token-by-token decoding; a gap fails the export.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from t2r import __version__
from t2r.convert.sources import TOKENIZER_FILES
from t2r.errors import T2RError
from t2r.fsutil import atomic_directory, check_destination, read_json_object
from t2r.models.hf_compat import output_cache
from t2r.models.loading import load_config, load_converted, load_tokenizer
from t2r.shards import DTYPES, parse_size
from t2r.train.run_record import RUN_FILE, read_run, rebuild_model, stage_output, teacher_weights_changed

PARITY_TOLERANCE = 1e-3
PARITY_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Linear-time recurrent models keep a fixed-size "
    "state instead of a growing cache of keys and values."
)


def decode_parity_gap(model, input_ids: torch.Tensor, prefill: int) -> float:
    """Relative gap between the parallel forward's logits and prefill + one-token-at-a-time decoding."""
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits.double()
        out = model(input_ids[:, :prefill], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(prefill, input_ids.shape[1]):
            steps.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    inc = torch.cat(steps, dim=1).double()
    return ((inc - full).norm() / full.norm().clamp_min(1e-30)).item()


def parity_input(model_dir: Path, vocab_size: int) -> torch.Tensor:
    try:
        ids = load_tokenizer(model_dir)(PARITY_PROMPT, return_tensors="pt").input_ids[:, :48]
        if ids.shape[1] >= 16:
            return ids
    except (OSError, ValueError):
        pass
    return torch.randint(0, vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))


def check_parity(model_dir: Path) -> float:
    """Load the written directory back (fp32, CPU) and measure the decode gap; raise if it is too large."""
    model = load_converted(model_dir, torch.float32).eval()
    ids = parity_input(model_dir, model.config.vocab_size)
    gap = decode_parity_gap(model, ids, prefill=ids.shape[1] // 3)
    if not gap <= PARITY_TOLERANCE:
        raise T2RError(
            f"parity check failed: step-by-step decoding differs from the parallel forward by "
            f"{gap:.3e} (relative, tolerance {PARITY_TOLERANCE:.0e}); nothing was written"
        )
    return gap


def export(
    run: str | Path,
    dest: str | Path,
    *,
    dtype: str | None = "bf16",
    max_shard_size: str = "5GB",
    adapter_only: bool = False,
    skip_check: bool = False,
    force: bool = False,
    fmt: str = "t2r",
) -> Path:
    """Export a finetuning run (merged, or its LoRA adapter alone) or a converted directory; with
    ``fmt="fla"`` also an FLA-compatible copy in DEST/fla."""
    src = Path(run)
    check_destination(dest, force)
    if dtype is not None and dtype not in DTYPES:
        raise T2RError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt not in ("t2r", "fla"):
        raise T2RError(f"--format must be t2r or fla, got {fmt!r}")
    if fmt == "fla" and adapter_only:
        raise T2RError("--format fla writes merged weights; it cannot be combined with --adapter-only")
    parse_size(max_shard_size)
    if (src / RUN_FILE).is_file():
        info = read_run(src)
        if not info.stages_done:
            raise T2RError(f"run {src} has no finished stage to export (resume it first)")
        base_dir = Path(info.model_dir)
    elif (src / "config.json").is_file():
        info, base_dir = None, src
    else:
        raise T2RError(f"{src} has no checkpoint: neither a t2r run ({RUN_FILE}) nor a model directory")
    reads = [src, base_dir]
    check_destination(dest, force, reads)
    conversion = _read_json(base_dir / "conversion.json")
    config = None
    if fmt == "fla":
        from t2r.export.fla import check_fla_compatible

        config = load_config(base_dir)
        check_fla_compatible(config)  # before anything is written
    started = time.time()
    with atomic_directory(dest, force=force, reads=reads) as tmp:
        if adapter_only:
            record = _export_adapter(src, info, tmp)
        else:
            model = rebuild_model(src) if info is not None else load_converted(src)
            if dtype is not None:
                model = model.to(DTYPES[dtype])
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            del model
            for name in TOKENIZER_FILES:
                if (base_dir / name).is_file() and not (tmp / name).exists():
                    shutil.copyfile(base_dir / name, tmp / name)
            gap = None if skip_check else check_parity(tmp)
            record = {"kind": "merged", "dtype": dtype, "parity_gap": gap, "parity_checked": not skip_check}
            if config is not None:
                from t2r.export.fla import write_fla

                config.dtype = DTYPES[dtype] if dtype is not None else None
                record["fla"] = {"dir": "fla", "tensors": write_fla(tmp, tmp / "fla", config, max_shard_size)}
        record.update(
            t2r_version=__version__,
            source=str(src.resolve()),
            base_model=str(base_dir),
            teacher=(conversion or {}).get("source"),
            conversion_options=(conversion or {}).get("options"),
            stages=[dataclasses.asdict(s) for s in info.stages_done] if info else [],
            recipe=info.recipe if info else None,
            teacher_eval=info.teacher_eval if info else None,
            converted_eval=info.converted_eval if info else None,
            seconds=round(time.time() - started, 1),
        )
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(export_card(record))
    return Path(dest)


def _read_json(path: Path) -> dict | None:
    return read_json_object(path, "export") if path.is_file() else None


def _export_adapter(src: Path, info: dict | None, tmp: Path) -> dict:
    """The last stage's peft adapter, valid only when its base is the converted checkpoint itself."""
    if info is None or info.stages_done[-1].kind != "adapter":
        raise T2RError("--adapter-only needs a run whose last stage trained LoRA")
    if teacher_weights_changed(info.stages_done[:-1]):
        raise T2RError(
            "--adapter-only: earlier stages changed base weights, so the adapter has no published base; "
            "export the merged model instead"
        )
    shutil.copytree(stage_output(src, info.stages_done[-1]), tmp, dirs_exist_ok=True)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = info.model_dir
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {
        "kind": "adapter",
        "parity_checked": False,
        "note": "earlier stages only trained gates and norms, which the adapter carries as modules_to_save",
    }


def export_card(record: dict) -> str:
    teacher = record.get("teacher") or {}
    base = teacher.get("repo_id") or teacher.get("spec") or record["base_model"]
    lines = [
        "---",
        "library_name: transformers" if record["kind"] == "merged" else "library_name: peft",
        "tags: [t2r, gated-slot-attention, linear-attention, rnn]",
    ]
    if teacher.get("repo_id"):
        lines.append(f"base_model: {teacher['repo_id']}")
    lines += [
        "---",
        "",
        f"# Gated Slot Attention model from {base}",
        "",
        f"Exported by t2r {record['t2r_version']} ({record['kind']}"
        + (f", {record['dtype']}" if record.get("dtype") else "")
        + ").",
        "",
    ]
    opts = record.get("conversion_options") or {}
    if opts:
        lines += ["## Conversion", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in opts.items() if k not in ("max_shard_size",)]
        lines.append("")
    if record["stages"]:
        lines += [
            "## Training",
            "",
            "| stage | trained | losses | steps | tokens | wall time | held-out ppl |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in record["stages"]:
            ppl = (s.get("final_eval") or {}).get("eval_ppl")
            lines.append(
                f"| {s['name']} | {s['train']} | {s['loss_weights']} | {s['steps']} | {s['tokens']:,} | "
                f"{s['seconds']} s | {f'{ppl:.3f}' if ppl else '-'} |"
            )
        lines.append("")
    t_ev, c_ev = record.get("teacher_eval") or {}, record.get("converted_eval") or {}
    if t_ev:
        lines += [
            "## Held-out perplexity (training run's split)",
            "",
            f"teacher {t_ev['eval_ppl']:.3f}; converted before training {c_ev.get('eval_ppl', float('nan')):.3f}; "
            f"after the last stage {(record['stages'][-1].get('final_eval') or {}).get('eval_ppl', float('nan')):.3f}.",
            "",
        ]
    if record["kind"] == "merged":
        check = (
            f"passed: relative gap {record['parity_gap']:.2e} between the parallel forward and step-by-step decoding"
            if record["parity_checked"]
            else "**skipped** (--skip-check): decode parity was not verified"
        )
        lines += ["## Decode parity check", "", check, ""]
    if record.get("fla"):
        lines += [
            "## FLA layout",
            "",
            "`fla/` holds the same weights under flash-linear-attention's `gsa` model type and tensor names: "
            '`import fla` and `AutoModelForCausalLM.from_pretrained("PATH/fla")`.',
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "import t2r  # or pass trust_remote_code=True where t2r is not installed",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tok = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)
