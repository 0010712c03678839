"""Zero-shot tasks scored the way lm-evaluation-harness (0.4.x, ``hf`` model backend) scores them.

Why a re-implementation: t2r must not depend on lm-eval, scores in-memory student and teacher side by side, and
must run offline from local files. Every convention below is lm-eval's, stated where it is applied:
- prompts, choices and gold answers: each task's lm-eval YAML (``TASK_SPECS`` names it);
- tokenization of a (context, continuation) pair and of rolling windows: HFLM's rules (``PairEncoder``);
- scores: summed log-probabilities of the continuation tokens and greedy agreement (``score_token_requests``);
- metrics: lm-eval's per-task metrics and aggregations (``_mc_metrics``, ``_lambada_metrics``, ``_rolling_metrics``).
``benchmarks/lm_eval_crosscheck.py`` runs lm-eval itself on the same examples; docs/zeroshot_crosscheck.md has
the side-by-side numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from t2r.errors import T2RError
from t2r.eval.loglikelihood import PairEncoder, resolve_max_length, rolling_windows, score_token_requests
from t2r.eval.tasks import (
    CHOICE_DOCS,
    PERPLEXITIES,
    TASK_SPECS,
    TASKS,
    ChoiceDoc,
    Task,
    count_words,
    lambada_pair,
    load_task,
    wikitext_detokenize,
)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy.argmax, which lm-eval uses)."""
    return max(range(len(values)), key=values.__getitem__)


def _mc_metrics(docs: list[ChoiceDoc], lls: list[list[float]], metrics: tuple[str, ...]) -> tuple[dict, dict]:
    """lm-eval multiple_choice: acc = the choice of highest summed log-likelihood is gold; acc_norm = the same with
    each log-likelihood divided by the choice's length in characters (len(choice), the choice string without the
    target delimiter; lm-eval's byte-length variant is acc_bytes, not reported by these tasks). Means over items."""
    pred = [_argmax(ll) for ll in lls]
    pred_norm = [
        _argmax([x / len(c) if c else -math.inf for x, c in zip(ll, d.choices, strict=True)])
        for d, ll in zip(docs, lls, strict=True)
    ]
    gold = [d.gold for d in docs]
    values = {
        "acc": sum(p == g for p, g in zip(pred, gold, strict=True)) / len(docs),
        "acc_norm": sum(p == g for p, g in zip(pred_norm, gold, strict=True)) / len(docs),
    }
    details = {"loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm, "gold": gold}
    return {m: values[m] for m in metrics}, details


def _lambada_metrics(scores: list[tuple[float, bool]]) -> tuple[dict, dict]:
    """lm-eval lambada_openai: acc = mean of is_greedy (every target token is the argmax); ppl = the ``perplexity``
    aggregation, exp(-mean over examples of the target's summed log-likelihood)."""
    lls = [s[0] for s in scores]
    greedy = [s[1] for s in scores]
    metrics = {"acc": sum(greedy) / len(scores), "ppl": math.exp(-sum(lls) / len(lls))}
    return metrics, {"loglikelihoods": lls, "greedy": greedy}


def _rolling_metrics(lls: list[float], pages: list[str]) -> tuple[dict, dict]:
    """lm-eval wikitext (weighted_perplexity / bits_per_byte aggregations over articles): word_perplexity =
    exp(-sum(ll) / sum(words)), byte_perplexity = exp(-sum(ll) / sum(bytes)), bits_per_byte = -sum(ll) / sum(bytes)
    / ln 2, with words (``count_words``) and UTF-8 bytes counted on the original pages."""
    words = [count_words(p) for p in pages]
    nbytes = [len(p.encode("utf-8")) for p in pages]
    total = sum(lls)
    metrics = {
        "word_perplexity": math.exp(-total / sum(words)),
        "byte_perplexity": math.exp(-total / sum(nbytes)),
        "bits_per_byte": -total / sum(nbytes) / math.log(2),
    }
    return metrics, {"loglikelihoods": lls, "words": words, "bytes": nbytes}


@dataclass
class TaskScore:
    """A task's metrics for one model and the per-example values they came from."""

    metrics: dict[str, float]
    n: int
    details: dict


class _Requests:
    """A task's token requests, built once per (task, max_length) and scored for each model."""

    def __init__(self, task: Task, encoder: PairEncoder, max_length: int):
        self.task, self.max_length = task, max_length
        if task.kind == "multiple_choice":
            self.docs = [CHOICE_DOCS[task.name](r) for r in task.records]
            pairs = [p for d in self.docs for p in zip(d.contexts, d.continuations, strict=True)]
            self.tokens = encoder.encode_pairs(pairs)
        elif task.kind == "loglikelihood":
            self.tokens = encoder.encode_pairs([lambada_pair(r) for r in task.records])
        else:
            self.pages = [r["page"] for r in task.records]
            encoded = encoder.encode([wikitext_detokenize(p) for p in self.pages])
            windows = [rolling_windows(t, encoder.prefix_id, max_length) for t in encoded]
            self.window_counts = [len(w) for w in windows]
            self.tokens = [w for ws in windows for w in ws]

    def score(self, model: nn.Module, batch_size: int, progress: bool, desc: str) -> TaskScore:
        scores = score_token_requests(
            model, self.tokens, max_length=self.max_length, batch_size=batch_size, progress=progress, desc=desc
        )
        task = self.task
        if task.kind == "multiple_choice":
            lls, k = [], 0
            for d in self.docs:
                lls.append([s[0] for s in scores[k : k + len(d.contexts)]])
                k += len(d.contexts)
            metrics, details = _mc_metrics(self.docs, lls, task.metrics)
        elif task.kind == "loglikelihood":
            metrics, details = _lambada_metrics(scores)
        else:
            per_page, k = [], 0
            for n in self.window_counts:
                per_page.append(sum(s[0] for s in scores[k : k + n]))
                k += n
            metrics, details = _rolling_metrics(per_page, self.pages)
        return TaskScore(metrics, len(task.records), details)


def score_task(
    model: nn.Module,
    tokenizer,
    task: Task,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> TaskScore:
    """One model on one loaded task (metrics plus per-example details)."""
    if not task.records:
        raise T2RError(f"{task.name}: no records to evaluate")
    length = max_length or resolve_max_length(model, tokenizer)
    return _Requests(task, PairEncoder(tokenizer), length).score(model, batch_size, progress, task.name)


# ------------------------------------------------------------------------------------------ several models
def evaluate_tasks(
    models: dict[str, nn.Module],
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    details: bool = False,
) -> dict:
    """Every model on every task, with the same tokenizer and requests; JSON-serialisable.

    ``result["tasks"][task]``: main_metric, metrics, n, source, and ``scores[model]`` = every metric + n (with
    ``details``, also ``details[model]``: the per-example log-likelihoods and decisions). ``result["recovery"]``
    (two or more models): see ``recovery``. ``max_length`` None: each model's own context length, as lm-eval
    (``resolve_max_length``)."""
    if not models:
        raise T2RError("no models to evaluate")
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown:
        raise T2RError(f"unknown zero-shot task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    encoder = PairEncoder(tokenizer)
    lengths = {name: max_length or resolve_max_length(m, tokenizer) for name, m in models.items()}
    result: dict = {
        "models": list(models),
        "settings": {"limit": limit, "batch_size": batch_size, "max_length": lengths, "lm_eval_conventions": "0.4.x"},
        "tasks": {},
    }
    for name in tasks:
        task = load_task(name, data_dir, limit)
        if not task.records:
            raise T2RError(f"{name}: no records to evaluate")
        built: dict[int, _Requests] = {}
        scores, per_example = {}, {}
        for model_name, model in models.items():
            length = lengths[model_name]
            if length not in built:
                built[length] = _Requests(task, encoder, length)
            score = built[length].score(model, batch_size, progress, f"{name} ({model_name})")
            scores[model_name] = {**score.metrics, "n": score.n}
            per_example[model_name] = score.details
        result["tasks"][name] = {
            "lm_eval_task": TASK_SPECS[name].lm_eval_task,
            "main_metric": task.main_metric,
            "metrics": list(task.metrics),
            "n": len(task.records),
            "source": task.source,
            "scores": scores,
        }
        if details:
            result["tasks"][name]["details"] = per_example
    rec = recovery(result)
    if rec is not None:
        result["recovery"] = rec
    return result


def _reference(models: list[str]) -> str | None:
    """The model recoveries are relative to: "teacher" if present, else the last of two or more models."""
    if len(models) < 2:
        return None
    return "teacher" if "teacher" in models else models[-1]


def _ratio(value: float, reference: float, metric: str) -> float | None:
    """model/reference for accuracies; reference/model for perplexities, so that higher is better for both."""
    num, den = (reference, value) if metric in PERPLEXITIES else (value, reference)
    return num / den if den else None


def recovery(result: dict) -> dict | None:
    """Each model against the reference (``_reference``): per task the main metric's ratio (perplexities inverted:
    teacher/student), and ``average``: the mean over the tasks whose main metric is an accuracy. Perplexity tasks stay
    out of the average, as in the lm-eval-based T2R papers (LoLCATs, Liger), and are reported under ``perplexity``
    (with LAMBADA's ppl, a secondary metric). None with a single model."""
    reference = _reference(result["models"])
    if reference is None:
        return None
    out: dict = {
        "reference": reference,
        "definition": "model/reference for accuracies; reference/model for perplexities (higher is better); "
        "average: mean over tasks whose main metric is an accuracy",
        "models": {},
    }
    for model in result["models"]:
        if model == reference:
            continue
        per_task, perplexity = {}, {}
        for name, entry in result["tasks"].items():
            ref, mine = entry["scores"][reference], entry["scores"][model]
            main = entry["main_metric"]
            per_task[name] = {"metric": main, "ratio": _ratio(mine[main], ref[main], main)}
            for metric in entry["metrics"]:
                if metric in ("ppl", "word_perplexity"):
                    perplexity[f"{name}/{metric}"] = _ratio(mine[metric], ref[metric], metric)
        accuracy = [v["ratio"] for v in per_task.values() if v["metric"] not in PERPLEXITIES and v["ratio"] is not None]
        out["models"][model] = {
            "tasks": per_task,
            "average": sum(accuracy) / len(accuracy) if accuracy else None,
            "average_over": [t for t, v in per_task.items() if v["metric"] not in PERPLEXITIES],
            "perplexity": perplexity,
        }
    return out


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric in PERPLEXITIES else f"{100 * value:.2f}"


def format_table(result: dict) -> str:
    """A plain-text table: per task and metric (main metric starred) each model's value (accuracies in %) and,
    with a reference model, each other model's recovery; then the average recovery over accuracy tasks."""
    models = result["models"]
    rec = result.get("recovery")
    others = [m for m in models if rec and m != rec["reference"]]
    header = ["task", "metric", *models, *(f"{m}/{rec['reference']}" for m in others)]
    lines = []
    for name, entry in result["tasks"].items():
        for metric in entry["metrics"]:
            star = "*" if metric == entry["main_metric"] else ""
            row = [name, f"{metric}{star}", *(_fmt(entry["scores"][m][metric], metric) for m in models)]
            for m in others:
                ratio = _ratio(entry["scores"][m][metric], entry["scores"][rec["reference"]][metric], metric)
                row.append("-" if ratio is None else f"{100 * ratio:.1f}%")
            lines.append(row)
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    text = [
        "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *lines]
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append("* main metric; accuracies in %; perplexity recovery = reference/model (higher is better)")
    for m in others:
        info = rec["models"][m]
        if info["average"] is not None:
            text.append(
                f"{m}: average recovery {100 * info['average']:.1f}% over the accuracy tasks "
                f"({', '.join(info['average_over'])}); perplexity tasks are reported apart"
            )
    return "\n".join(text)


def plot_recovery(result: dict, png: Path) -> Path:
    """Bars per task for every model (main metrics): accuracies on the left, perplexities (log scale) on the
    right; each non-reference bar is labelled with its recovery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    models = result["models"]
    rec = result.get("recovery")
    groups = {
        "accuracy": [t for t, e in result["tasks"].items() if e["main_metric"] not in PERPLEXITIES],
        "perplexity": [t for t, e in result["tasks"].items() if e["main_metric"] in PERPLEXITIES],
    }
    panels = [(k, v) for k, v in groups.items() if v]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.6 * sum(len(v) for _, v in panels), 4.5), squeeze=False)
    width = 0.8 / len(models)
    for ax, (kind, names) in zip(axes[0], panels, strict=True):
        lowest, highest = math.inf, -math.inf
        for j, model in enumerate(models):
            values = [result["tasks"][t]["scores"][model][result["tasks"][t]["main_metric"]] for t in names]
            values = [100 * v for v in values] if kind == "accuracy" else values
            lowest, highest = min(lowest, *values), max(highest, *values)
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, values, width, label=model)
            if rec and model != rec["reference"]:
                ratios = [rec["models"][model]["tasks"][t]["ratio"] for t in names]
                ax.bar_label(bars, [f"{100 * r:.0f}%" if r is not None else "" for r in ratios], fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{t}\n{result['tasks'][t]['main_metric']}" for t in names], fontsize=8)
        if kind == "accuracy":
            ax.set(ylabel="accuracy (%)", title="zero-shot accuracy (higher is better)")
            ax.set_ylim(0, max(highest * 1.12, 1e-3))  # room for the recovery labels
        else:
            ax.set(ylabel="perplexity", title="perplexity (lower is better)", yscale="log")
            ax.set_ylim(max(lowest / 2, 1e-3), highest * 2)  # log bars need a visible floor, labels a ceiling
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
