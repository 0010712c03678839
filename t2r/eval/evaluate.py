"""Evaluation: held-out perplexity over fixed windows and passkey retrieval, student beside its teacher.

The teacher is rebuilt from the converted checkpoint the student came from (its tensors are the teacher's),
as the teacher architecture's own transformers class: same tokenizer, same windows, same prompts.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import torch
from torch import nn

from t2r.devices import resolve_device
from t2r.errors import T2RError
from t2r.models.loading import load_converted
from t2r.train.runs import RUN_FILE, read_run, rebuild_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def _converted_dir(path: Path) -> Path | None:
    """The converted checkpoint behind a run, an export or a converted directory."""
    if (path / RUN_FILE).is_file():
        return Path(read_run(path)["model_dir"])
    if (path / "export.json").is_file():
        return Path(json.loads((path / "export.json").read_text())["base_model"])
    if (path / "conversion.json").is_file():
        return path
    return None


def load_student_and_teacher(path: str | Path, device: str, dtype: torch.dtype, with_teacher: bool = True):
    from transformers import AutoTokenizer

    from t2r.teacher import teacher_view

    path = Path(path)
    student = rebuild_model(path, dtype=dtype) if (path / RUN_FILE).is_file() else load_converted(path, dtype)
    base = _converted_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(base if (path / RUN_FILE).is_file() else path)
    teacher = None
    if with_teacher and base is not None:
        teacher = teacher_view(load_converted(base, dtype)).to(device).eval()
    return student.to(device).eval(), teacher, tokenizer


# ------------------------------------------------------------------------------------------------ perplexity
def token_stream(specs: list[str], tokenizer, text_field: str = "text") -> torch.Tensor:
    from t2r.train.data import load_documents, tokenize_documents

    docs = tokenize_documents(load_documents(specs, text_field), tokenizer, add_eos=True)
    return torch.tensor([t for ids in docs["input_ids"] for t in ids], dtype=torch.long)


POSITION_EDGES = (0, 64, 256, 1024, 2048, 4096, 8192, 16384)


def position_buckets(window: int) -> list[tuple[int, int]]:
    """[lo, hi) target-position ranges; the first 64 sit inside a W=64 window, the rest test the memory."""
    edges = [e for e in POSITION_EDGES if e < window - 1] + [window - 1]
    return list(itertools.pairwise(edges))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, window: int, max_windows: int, batch: int = 4) -> dict:
    """Mean next-token NLL over the first ``max_windows`` non-overlapping windows (each scored from scratch),
    also split by position, because a recurrent student can match the teacher early and lose it later."""
    n = min(len(tokens) // window, max_windows)
    if n == 0:
        raise T2RError(f"the evaluation data has fewer than {window} tokens")
    rows = tokens[: n * window].view(n, window)
    device = next(model.parameters()).device
    per_position = torch.zeros(window - 1, dtype=torch.float64)
    for i in range(0, n, batch):
        ids = rows[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
        per_position += loss.sum(0).double().cpu()
    count = n * (window - 1)
    nll = per_position.sum().item() / count
    by_position = {
        f"{lo}-{hi}": round(math.exp(min(per_position[lo:hi].mean().item() / n, 50.0)), 4)
        for lo, hi in position_buckets(window)
    }
    return {
        "window": window,
        "windows": n,
        "tokens": count,
        "nll": nll,
        "ppl": math.exp(min(nll, 50.0)),
        "ppl_by_position": by_position,
    }


# --------------------------------------------------------------------------------------------------- passkey
def passkey_prompts(tokenizer, context: int, trials: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(prompt, key, depth) with a random 5-digit key at evenly spread depths; about ``context`` tokens."""
    rng = random.Random(f"{seed}-{context}")
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    fixed = len(
        tokenizer(
            INTRO + QUESTION + "The pass key is 00000. Remember it. 00000 is the pass key.\n", add_special_tokens=False
        ).input_ids
    )
    reps = max(1, (context - fixed) // per_filler)
    prompts = []
    for i in range(trials):
        key = str(rng.randint(10000, 99999))
        depth = (i + 0.5) / trials
        before = round(reps * depth)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
        prompts.append((INTRO + FILLER * before + needle + FILLER * (reps - before) + QUESTION, key, depth))
    return prompts


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, context: int, trials: int, seed: int = 0, batch: int = 8) -> dict:
    prompts = passkey_prompts(tokenizer, context, trials, seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    hits, lengths, answers = [], [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        enc = tokenizer([p for p, _, _ in chunk], return_tensors="pt", padding=True).to(device)
        lengths += enc.attention_mask.sum(1).tolist()
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        hits += [key in text for text, (_, key, _) in zip(texts, chunk, strict=True)]
        answers += texts
    by_depth = {}
    for hit, (_, _, depth) in zip(hits, prompts, strict=True):
        by_depth.setdefault(round(depth, 1), []).append(hit)
    return {
        "context": context,
        "trials": trials,
        "accuracy": sum(hits) / len(hits),
        "mean_prompt_tokens": round(sum(lengths) / len(lengths)),
        "by_depth": {str(d): sum(v) / len(v) for d, v in sorted(by_depth.items())},
        # What a model says instead of the key (wrong digits, the filler, nothing) tells where retrieval fails.
        "samples": [
            {"depth": round(depth, 3), "key": key, "answer": answer}
            for answer, (_, key, depth) in list(zip(answers, prompts, strict=True))[:: max(1, len(prompts) // 8)]
        ],
    }


MIN_PASSKEY_CONTEXT = 128  # the passkey prompt's fixed text alone is 67 SmolLM2 tokens, one filler 25


def check_options(do_ppl: bool, windows, max_windows: int, do_passkey: bool, contexts, trials: int, batch: int) -> None:
    """One-line errors for the options in use that would divide by zero or build prompts longer than asked."""
    if do_ppl and (not windows or min(windows) < 2):
        raise T2RError(f"--window must be at least 2 tokens, got {list(windows)}")
    if do_passkey and (not contexts or min(contexts) < MIN_PASSKEY_CONTEXT):
        raise T2RError(f"--context must be at least {MIN_PASSKEY_CONTEXT} tokens, got {list(contexts)}")
    counts = {"--batch": batch}
    if do_ppl:
        counts["--max-windows"] = max_windows
    if do_passkey:
        counts["--trials"] = trials
    for name, value in counts.items():
        if value < 1:
            raise T2RError(f"{name} must be at least 1, got {value}")


# ------------------------------------------------------------------------------------------------ entry point
def evaluate(
    path: str | Path,
    data: list[str] | None,
    do_ppl: bool = True,
    do_passkey: bool = True,
    windows: tuple[int, ...] = (2048, 4096),
    max_windows: int = 32,
    contexts: tuple[int, ...] = (1024, 2048, 4096),
    trials: int = 100,
    seed: int = 0,
    device: str | None = None,
    batch: int = 4,
    with_teacher: bool = True,
) -> dict:
    device = resolve_device(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if do_ppl and not data:
        raise T2RError("--ppl needs --data (held-out text)")
    check_options(do_ppl, windows, max_windows, do_passkey, contexts, trials, batch)
    student, teacher, tokenizer = load_student_and_teacher(path, device, dtype, with_teacher)
    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    result: dict = {"model": str(path), "device": device, "ppl": {}, "passkey": {}}
    if do_ppl:
        tokens = token_stream(data, tokenizer)
        result["eval_tokens_available"] = len(tokens)
        for name, model in models.items():
            result["ppl"][name] = [perplexity(model, tokens, w, max_windows, batch) for w in windows]
    if do_passkey:
        for name, model in models.items():
            result["passkey"][name] = [
                passkey_accuracy(model, tokenizer, c, trials, seed, batch=max(batch, 8)) for c in contexts
            ]
    return result


def format_table(result: dict) -> str:
    lines = []
    names = list(result["ppl"] or result["passkey"])
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
    return "\n".join(lines)
