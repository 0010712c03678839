"""The zero-shot tasks as lm-evaluation-harness defines them: where each task's data is (local xz files, or the
Hugging Face hub by name), and each record's prompt, choices and gold answer (each task's lm-eval YAML, named in
``TASK_SPECS``). Scoring is in loglikelihood.py, metrics and the teacher-beside-student report in zeroshot.py."""

from __future__ import annotations

import json
import lzma
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from t2r.errors import T2RError

TASKS: tuple[str, ...] = (
    "lambada",
    "piqa",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "wikitext2",
    "hellaswag",
    "mmlu",
)
DEFAULT_TASKS: tuple[str, ...] = ("lambada", "piqa", "arc_easy", "arc_challenge", "winogrande", "wikitext2")

HIGHER_IS_BETTER = {
    "acc": True,
    "acc_norm": True,
    "ppl": False,
    "word_perplexity": False,
    "byte_perplexity": False,
    "bits_per_byte": False,
}
PERPLEXITIES = frozenset(m for m, up in HIGHER_IS_BETTER.items() if not up)  # lower is better: ratios invert


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how it is scored. ``kind``: multiple_choice, loglikelihood or rolling."""

    lm_eval_task: str
    kind: str
    metrics: tuple[str, ...]
    main_metric: str
    local_file: str | None
    hub: tuple[tuple[str, str | None, str], ...]  # (dataset id, config, split), tried in order


# Main metrics follow what the T2R papers report (LoLCATs, Liger): acc, but acc_norm for ARC-Challenge and
# HellaSwag; word perplexity for WikiText-2.
TASK_SPECS: dict[str, TaskSpec] = {
    "lambada": TaskSpec(
        "lambada_openai",
        "loglikelihood",
        ("acc", "ppl"),
        "acc",
        "lambada_openai_test.jsonl.xz",
        (("EleutherAI/lambada_openai", "default", "test"),),
    ),
    "piqa": TaskSpec(
        "piqa",
        "multiple_choice",
        ("acc", "acc_norm"),
        "acc",
        "piqa_valid.jsonl.xz",
        (("baber/piqa", None, "validation"), ("ybisk/piqa", None, "validation")),
    ),
    "arc_easy": TaskSpec(
        "arc_easy",
        "multiple_choice",
        ("acc", "acc_norm"),
        "acc",
        "arc_easy_test.jsonl.xz",
        (("allenai/ai2_arc", "ARC-Easy", "test"),),
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge",
        "multiple_choice",
        ("acc", "acc_norm"),
        "acc_norm",
        "arc_challenge_test.jsonl.xz",
        (("allenai/ai2_arc", "ARC-Challenge", "test"),),
    ),
    "winogrande": TaskSpec(
        "winogrande",
        "multiple_choice",
        ("acc",),
        "acc",
        "winogrande_dev.jsonl.xz",
        (("allenai/winogrande", "winogrande_xl", "validation"),),
    ),
    "wikitext2": TaskSpec(
        "wikitext",
        "rolling",
        ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        "word_perplexity",
        "wikitext2_test_raw.txt.xz",
        (("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),),
    ),
    # Hub tasks; a local JSON-lines file in the hub's field layout is used when present.
    "hellaswag": TaskSpec(
        "hellaswag",
        "multiple_choice",
        ("acc", "acc_norm"),
        "acc_norm",
        "hellaswag_validation.jsonl.xz",
        (("Rowan/hellaswag", None, "validation"),),
    ),
    "mmlu": TaskSpec(
        "mmlu",
        "multiple_choice",
        ("acc",),
        "acc",
        "mmlu_test.jsonl.xz",
        (("cais/mmlu", "all", "test"),),
    ),
}


@dataclass
class Task:
    """One task's records (in the local files' field layout, whichever source they came from)."""

    name: str
    records: list[dict]
    metrics: tuple[str, ...]
    main_metric: str
    source: str = ""
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = TASK_SPECS[self.name].kind


# ------------------------------------------------------------------------------------------------------- data
def default_data_dir() -> Path | None:
    """$T2R_EVAL_DATA, else ../shared/data/eval from the current directory when it exists (a checkout's layout)."""
    env = os.environ.get("T2R_EVAL_DATA")
    if env:
        return Path(env)
    guess = Path.cwd().parent / "shared" / "data" / "eval"
    return guess if guess.is_dir() else None


def _read_jsonl_xz(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_text_xz(path: Path) -> str:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def wikitext_pages(raw: str) -> list[str]:
    """Split raw WikiText (wiki.test.raw) into articles as EleutherAI/wikitext_document_level does (the dataset
    lm-eval's ``wikitext`` task reads): a new page starts at each level-1 heading line (`` = Title = `` once level-2
    and level-3 headings are collapsed), pages are the lines joined by newlines, whitespace-only pages are dropped
    except the last one, which keeps the file's final empty line."""
    pages: list[str] = []
    lines: list[str] = []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def _read_local(name: str, path: Path) -> list[dict]:
    if name == "wikitext2":
        return [{"page": p} for p in wikitext_pages(_read_text_xz(path))]
    return _read_jsonl_xz(path)


# Hub rows -> the local layout. Only the fields the prompts use are kept.
def _hub_hellaswag(row: dict) -> dict:
    keys = ("activity_label", "ctx_a", "ctx_b", "endings")
    return {**{k: row[k] for k in keys}, "label": int(row["label"])}


def _hub_mmlu(row: dict) -> dict:
    return {k: row[k] for k in ("question", "subject", "choices")} | {"answer": int(row["answer"])}


def _hub_arc(row: dict) -> dict:
    choices = row["choices"]
    return {
        "id": row.get("id"),
        "question": row["question"],
        "choices": {"text": list(choices["text"]), "label": list(choices["label"])},
        "answerKey": row["answerKey"],
    }


HUB_TO_RECORD: dict[str, Callable[[dict], dict]] = {
    "lambada": lambda row: {"text": row["text"]},
    "piqa": lambda row: {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(row["label"])},
    "arc_easy": _hub_arc,
    "arc_challenge": _hub_arc,
    "winogrande": lambda row: {k: row[k] for k in ("sentence", "option1", "option2", "answer")},
    "wikitext2": lambda row: {"page": row["page"]},
    "hellaswag": _hub_hellaswag,
    "mmlu": _hub_mmlu,
}


def _hub_rows(dataset: str, config: str | None, split: str) -> list[dict]:
    from datasets import load_dataset  # only the hub path needs the datasets package

    return [dict(row) for row in load_dataset(dataset, config, split=split)]


def _load_hub(name: str) -> tuple[list[dict], str]:
    """The task's records from the Hugging Face hub (the dataset ids lm-eval reads), mapped to the local layout."""
    failures = []
    for dataset, config, split in TASK_SPECS[name].hub:
        try:
            rows = _hub_rows(dataset, config, split)
        except Exception as exc:  # any failure (offline, missing package, gated) falls through to the next source
            failures.append(f"{dataset}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        return [HUB_TO_RECORD[name](row) for row in rows], f"hub:{dataset}/{config or ''}/{split}"
    raise LookupError("; ".join(failures))


def _apply_limit(name: str, records: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records, as lm-eval's --limit; MMLU is a group of subject tasks, so per subject."""
    if limit is None:
        return records
    if name != "mmlu":
        return records[:limit]
    seen: dict[str, int] = {}
    kept = []
    for rec in records:
        n = seen.get(rec["subject"], 0)
        if n < limit:
            kept.append(rec)
        seen[rec["subject"]] = n + 1
    return kept


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> Task:
    """A task's records from ``data_dir`` (default: ``default_data_dir()``), else from the Hugging Face hub."""
    if name not in TASK_SPECS:
        raise T2RError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
    spec = TASK_SPECS[name]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / spec.local_file if root is not None and spec.local_file else None
    if path is not None and path.is_file():
        records, source = _read_local(name, path), str(path)
    else:
        where = f"no {path}" if path is not None else "no data directory (set T2R_EVAL_DATA)"
        try:
            records, source = _load_hub(name)
        except LookupError as exc:
            raise T2RError(f"{name}: {where}, and loading it from the Hugging Face hub failed ({exc})") from None
    return Task(name, _apply_limit(name, records, limit), spec.metrics, spec.main_metric, source)


# --------------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class ChoiceDoc:
    """A multiple-choice item as lm-eval builds it: one (context, continuation) request per choice; ``choices``
    are the choice strings whose character lengths normalise acc_norm."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


def _same_context(context: str, choices: Sequence[str], gold: int) -> ChoiceDoc:
    """The usual layout: shared context, continuation = target delimiter (one space) + choice."""
    return ChoiceDoc((context,) * len(choices), tuple(" " + c for c in choices), tuple(choices), gold)


def _piqa_doc(rec: dict) -> ChoiceDoc:
    """lm-eval piqa.yaml: "Question: {goal}\\nAnswer:", choices [sol1, sol2], gold = label."""
    return _same_context(f"Question: {rec['goal']}\nAnswer:", [rec["sol1"], rec["sol2"]], int(rec["label"]))


def _arc_doc(rec: dict) -> ChoiceDoc:
    """lm-eval arc_easy.yaml (arc_challenge includes it): gold = choices.label.index(answerKey), so labels
    "1".."4" work like "A".."E"."""
    labels = list(rec["choices"]["label"])
    if rec["answerKey"] not in labels:
        raise T2RError(f"ARC record {rec.get('id')}: answerKey {rec['answerKey']!r} is not among labels {labels}")
    context = f"Question: {rec['question']}\nAnswer:"
    return _same_context(context, list(rec["choices"]["text"]), labels.index(rec["answerKey"]))


def _winogrande_doc(rec: dict) -> ChoiceDoc:
    """lm-eval winogrande (partial scoring): each option fills the blank in its own context (the sentence up to
    the first "_"); the shared continuation is " " + the stripped rest of the sentence; gold = answer - 1."""
    sentence = rec["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + rec[k] for k in ("option1", "option2"))
    rest = " " + sentence[blank + 1 :].strip()
    return ChoiceDoc(contexts, (rest, rest), contexts, {"1": 0, "2": 1}[str(rec["answer"])])


def _hellaswag_clean(text: str) -> str:
    """lm-eval hellaswag utils.preprocess: strip, " [title]" -> ". ", drop "[...]" tags, one pass of "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(rec: dict) -> ChoiceDoc:
    """lm-eval hellaswag.yaml: query = clean(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) (Python's
    capitalize, which lowercases the rest), choices = cleaned endings, gold = label."""
    query = _hellaswag_clean(rec["activity_label"] + ": " + rec["ctx_a"] + " " + rec["ctx_b"].capitalize())
    return _same_context(query, [_hellaswag_clean(e) for e in rec["endings"]], int(rec["label"]))


def _mmlu_doc(rec: dict) -> ChoiceDoc:
    """lm-eval's default ``mmlu``: the subject description, the stripped question, lettered choices, "Answer:";
    continuations " A".." D"."""
    subject = " ".join(rec["subject"].split("_"))
    lettered = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", rec["choices"], strict=True))
    context = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{rec['question'].strip()}{lettered}\nAnswer:"
    )
    return _same_context(context, ["A", "B", "C", "D"], int(rec["answer"]))


CHOICE_DOCS: dict[str, Callable[[dict], ChoiceDoc]] = {
    "piqa": _piqa_doc,
    "arc_easy": _arc_doc,
    "arc_challenge": _arc_doc,
    "winogrande": _winogrande_doc,
    "hellaswag": _hellaswag_doc,
    "mmlu": _mmlu_doc,
}


def lambada_pair(rec: dict) -> tuple[str, str]:
    """lm-eval lambada_openai.yaml: split on single spaces; context = all but the last piece joined by spaces,
    target = " " + the last piece."""
    words = rec["text"].split(" ")
    return " ".join(words[:-1]), " " + words[-1]


# The (pattern, replacement) rewrites of lm-eval's wikitext_detokenizer, in its order. The second rule is a
# no-op in practice (its pattern contains literal slashes); it is kept so that the text is the same.
_WIKITEXT_RULES: tuple[tuple[str, str, bool], ...] = (  # (old, new, is_regex)
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def wikitext_detokenize(page: str) -> str:
    """The text lm-eval scores for a WikiText page: its tokenised spacing undone (``wikitext_detokenizer``)."""
    for old, new, is_regex in _WIKITEXT_RULES:
        page = re.sub(old, new, page) if is_regex else page.replace(old, new)
    return page


def count_words(page: str) -> int:
    """lm-eval's wikitext word count: pieces of ``re.split(r"\\s+", page)`` on the original (not detokenised) page.
    A page that starts or ends with whitespace counts an empty piece there (WikiText pages do both, so this is the
    whitespace-separated word count + 2 per article)."""
    return len(re.split(r"\s+", page))
