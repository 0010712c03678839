"""``t2r eval``: held-out perplexity by position, passkey retrieval and zero-shot tasks, student beside its teacher.

The teacher is rebuilt from the converted checkpoint the student came from (its tensors are the teacher's),
as the teacher architecture's own transformers class: same tokenizer, same windows, same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from t2r.devices import resolve_device
from t2r.eval.options import EvalOptions
from t2r.eval.passkey import passkey_accuracy
from t2r.eval.perplexity import perplexity, token_stream
from t2r.models.loading import load_converted, load_tokenizer
from t2r.train.run_record import RUN_FILE, read_run, rebuild_model


def _converted_dir(path: Path) -> Path | None:
    """The converted checkpoint behind a run, an export or a converted directory."""
    if (path / RUN_FILE).is_file():
        return Path(read_run(path).model_dir)
    if (path / "export.json").is_file():
        return Path(json.loads((path / "export.json").read_text())["base_model"])
    if (path / "conversion.json").is_file():
        return path
    return None


def load_student_and_teacher(path: str | Path, device: str, dtype: torch.dtype, with_teacher: bool = True):
    from t2r.teacher import teacher_view

    path = Path(path)
    student = rebuild_model(path, dtype=dtype) if (path / RUN_FILE).is_file() else load_converted(path, dtype)
    base = _converted_dir(path)
    tokenizer = load_tokenizer(base if (path / RUN_FILE).is_file() else path)
    teacher = None
    if with_teacher and base is not None:
        teacher = teacher_view(load_converted(base, dtype)).to(device).eval()
    return student.to(device).eval(), teacher, tokenizer


# ------------------------------------------------------------------------------------------------ entry point
def evaluate(path: str | Path, options: EvalOptions | None = None, progress: bool = True) -> dict:
    """Every part asked for (perplexity, passkey, zero-shot tasks) for the student and, by default, its teacher."""
    options = options or EvalOptions()
    options.validate()
    device = resolve_device(options.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    student, teacher, tokenizer = load_student_and_teacher(path, device, dtype, options.teacher)
    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    result: dict = {"model": str(path), "device": device, "ppl": {}, "passkey": {}}
    if options.ppl and options.data:
        tokens = token_stream(options.data, tokenizer)
        result["eval_tokens_available"] = len(tokens)
        for name, model in models.items():
            result["ppl"][name] = [
                perplexity(model, tokens, w, options.max_windows, options.batch) for w in options.windows
            ]
    if options.passkey:
        for name, model in models.items():
            result["passkey"][name] = [
                passkey_accuracy(model, tokenizer, c, options.trials, options.seed, batch=max(options.batch, 8))
                for c in options.contexts
            ]
    if options.tasks:
        from t2r.eval.zeroshot import evaluate_tasks

        result["zeroshot"] = evaluate_tasks(
            models, tokenizer, options.tasks, limit=options.limit, data_dir=options.data_dir,
            batch_size=4 * options.batch, max_length=options.max_length, progress=progress,
        )  # fmt: skip
    return result


def format_table(result: dict) -> str:
    lines = []
    names = list(result["ppl"] or result["passkey"] or ["student"])
    if result["ppl"]:
        lines.append("perplexity   | " + " | ".join(f"{n:>10}" for n in names) + " | ratio")

        def ppl_line(label: str, vals: list[float]) -> str:
            ratio = f"{vals[0] / vals[1]:.3f}x" if len(vals) > 1 else ""
            return f"{label} | " + " | ".join(f"{v:>10.3f}" for v in vals) + f" | {ratio}"

        for i, row in enumerate(result["ppl"][names[0]]):
            lines.append(ppl_line(f"window {row['window']:>5}", [result["ppl"][n][i]["ppl"] for n in names]))
            for span in row.get("ppl_by_position", {}):
                vals = [result["ppl"][n][i]["ppl_by_position"][span] for n in names]
                lines.append(ppl_line(f"  pos {span:>9}", vals))
    if result["passkey"]:
        lines.append("passkey      | " + " | ".join(f"{n:>10}" for n in names))
        for i, row in enumerate(result["passkey"][names[0]]):
            vals = [result["passkey"][n][i]["accuracy"] for n in names]
            lines.append(f"ctx {row['context']:>8} | " + " | ".join(f"{100 * v:>9.1f}%" for v in vals))
    if result.get("zeroshot"):
        from t2r.eval.zeroshot import format_table as zeroshot_table

        lines += ["", zeroshot_table(result["zeroshot"])] if lines else [zeroshot_table(result["zeroshot"])]
    return "\n".join(lines)
