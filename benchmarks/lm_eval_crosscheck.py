"""Cross-check t2r's zero-shot scores against lm-evaluation-harness itself, on the same local examples.

lm-eval runs its own task definitions (the YAMLs and preprocessing functions it ships) with only the data source
swapped for the local files (``dataset_path: json``: it cannot download here), through its ``hf`` model backend
loading each checkpoint directory like any user would. t2r's ``evaluate_tasks`` runs on the same records. Printed:
first, for every record of each task (HellaSwag and MMLU: sample records in their hub layouts), whether the request
strings and gold answers lm-eval builds equal t2r's (no model needed: ``--prompts-only``); then both
implementations' metrics side by side, and per model and task the largest per-request log-likelihood gap and the
number of examples whose decision (chosen answer; LAMBADA: greedy flag) differs.

Needs lm-eval in the environment (``pip install lm-eval``); t2r does not depend on it.

    python benchmarks/lm_eval_crosscheck.py --model teacher=DIR --model student=DIR \\
        --tasks piqa arc_easy lambada --limit 200 --wikitext-limit 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads local json files; never try the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import t2r  # noqa: F401  (registers the converted architectures, so lm-eval's AutoModel finds them)
from t2r.eval.tasks import (
    CHOICE_DOCS,
    HUB_TO_RECORD,
    TASK_SPECS,
    count_words,
    default_data_dir,
    lambada_pair,
    load_task,
    wikitext_detokenize,
    wikitext_pages,
)
from t2r.eval.zeroshot import evaluate_tasks

# The lm-eval YAML of each task (relative to lm_eval/tasks) and the split t2r's local file holds.
LM_EVAL_YAML = {
    "lambada": ("lambada/lambada_openai.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "wikitext2": ("wikitext/wikitext.yaml", "test"),
}


def local_jsonl(task: str, data_dir: Path, work: Path) -> Path:
    """The task's local file as plain JSON lines for lm-eval's json loader (WikiText: one {"page"} per article,
    split as EleutherAI/wikitext_document_level splits it)."""
    src = data_dir / TASK_SPECS[task].local_file
    dest = work / f"{task}.jsonl"
    with lzma.open(src, "rt", encoding="utf-8") as f:
        if task == "wikitext2":
            dest.write_text("".join(json.dumps({"page": p}) + "\n" for p in wikitext_pages(f.read())))
        else:
            with dest.open("w", encoding="utf-8") as out:
                shutil.copyfileobj(f, out)
    return dest


def lm_eval_config(task: str, data_file: Path) -> dict:
    """lm-eval's own config for the task (its YAML, includes and !function preprocessors resolved), reading the
    local file as the only split."""
    rel, split = LM_EVAL_YAML[task]
    return hub_config(rel, split, data_file)


# A few records in the hub layouts of the hub-only tasks (no local copy exists), for the prompt check.
HELLASWAG_SAMPLE = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "", "split": "val",
     "split_type": "indomain", "label": "3"},
    {"ind": 92, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye your hair [title] Pick a"
     " color.", "ctx_b": "Choose A SHADE close to your own.", "ctx": "", "endings": ["[step] Mix it  well.",
     "Apply it. [title] Rinse.", " Wait.", "[substeps] Wash [header] it."], "source_id": "", "split": "val",
     "split_type": "zeroshot", "label": "0"},
]  # fmt: skip
MMLU_SAMPLE = {
    "astronomy": [{"question": "  Why is Mars red? ", "subject": "astronomy",
                   "choices": ["Iron oxide", "Ice", "Plants", "Light"], "answer": 0}],
    "high_school_us_history": [{"question": "Who wrote the Declaration\nof Independence?",
                                "subject": "high_school_us_history",
                                "choices": ["Jefferson", "Adams", "Franklin", "Madison"], "answer": 0}],
}  # fmt: skip


def lm_eval_requests(cfg: dict) -> tuple[list, list]:
    """The docs and, per doc, the request arguments lm-eval's own task code builds from a config (no model)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = next(iter(get_task_dict([cfg], TaskManager()).values()))
    task.build_all_requests(limit=None, rank=0, world_size=1)
    per_doc: dict[int, list] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        per_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    docs = list(task.eval_docs)
    golds = [task.doc_to_text(d) if task.multiple_input else task.doc_to_target(d) for d in docs]
    return [per_doc[i] for i in range(len(docs))], golds, task, docs


def our_requests(name: str, records: list[dict]) -> tuple[list, list]:
    """t2r's request strings and gold answers for the same records."""
    if TASK_SPECS[name].kind == "multiple_choice":
        docs = [CHOICE_DOCS[name](r) for r in records]
        return [list(zip(d.contexts, d.continuations, strict=True)) for d in docs], [d.gold for d in docs]
    if TASK_SPECS[name].kind == "loglikelihood":
        return [[lambada_pair(r)] for r in records], [None] * len(records)
    return [[(wikitext_detokenize(r["page"]),)] for r in records], [None] * len(records)


def prompt_check(tasks: list[str], data_dir: Path, work: Path) -> dict:
    """Every request lm-eval builds (context and continuation strings; WikiText's scored text and word count) and
    every gold answer, against t2r's, for all records of each local task; HellaSwag and MMLU on sample records."""
    cases = [(t, lm_eval_config(t, local_jsonl(t, data_dir, work)), load_task(t, data_dir).records) for t in tasks]
    sample = work / "hellaswag.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_SAMPLE))
    cases.append(("hellaswag", hub_config("hellaswag/hellaswag.yaml", "validation", sample),
                  [HUB_TO_RECORD["hellaswag"](r) for r in HELLASWAG_SAMPLE]))  # fmt: skip
    for subject, rows in MMLU_SAMPLE.items():
        path = work / f"mmlu_{subject}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cases.append(("mmlu", hub_config(f"mmlu/default/mmlu_{subject}.yaml", "test", path), rows))
    out: dict = {}
    for name, cfg, records in cases:
        theirs, their_gold, task, docs = lm_eval_requests(cfg)
        ours, our_gold = our_requests(name, records)
        entry = out.setdefault(name, {"records": 0, "requests_differ": 0, "golds_differ": 0})
        entry["records"] += len(records)
        entry["requests_differ"] += sum(
            list(map(tuple, a)) != list(map(tuple, b)) for a, b in zip(ours, theirs, strict=True)
        )
        if TASK_SPECS[name].kind == "multiple_choice":
            entry["golds_differ"] += sum(a != b for a, b in zip(our_gold, their_gold, strict=True))
        if name == "wikitext2":
            words = [task.process_results(d, [0.0])["word_perplexity"][1] for d in docs]
            entry["word_counts_differ"] = sum(count_words(r["page"]) != w for r, w in zip(records, words, strict=True))
            entry["words"] = sum(words)
    return out


def hub_config(rel: str, split: str, data_file: Path) -> dict:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / rel, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(data_file)}},
               training_split=None, validation_split=split if split == "validation" else None,
               test_split=split if split == "test" else None, fewshot_split=None)  # fmt: skip
    return cfg


def run_lm_eval(
    model_dir: str, configs: list[dict], limit: int | None, batch_size: int, max_length: int | None
) -> dict:
    import lm_eval

    model_args = {"pretrained": model_dir, "dtype": "float32"} | ({"max_length": max_length} if max_length else {})
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=configs,
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    return out


def lm_eval_values(out: dict, lm_task: str, task: str) -> tuple[dict, list, list | None]:
    """Metrics (renamed to t2r's), per-document log-likelihoods and (LAMBADA) greedy flags from an lm-eval result."""
    raw = out["results"][lm_task]
    names = {"perplexity": "ppl"}
    metrics = {}
    for key, value in raw.items():
        if "," in key and not key.split(",")[0].endswith("_stderr"):
            metric = key.split(",")[0]
            metrics[names.get(metric, metric)] = value
    samples = sorted(out["samples"][lm_task], key=lambda s: s["doc_id"])
    kind = TASK_SPECS[task].kind
    if kind == "multiple_choice":
        return metrics, [[float(r[0]) for r in s["filtered_resps"]] for s in samples], None
    if kind == "loglikelihood":
        pairs = [s["filtered_resps"][0] for s in samples]
        return metrics, [float(p[0]) for p in pairs], [bool(p[1]) for p in pairs]
    return metrics, [float(s["filtered_resps"][0]) for s in samples], None


def compare_lls(ours: list, theirs: list) -> float:
    flat = lambda xs: [v for x in xs for v in (x if isinstance(x, list) else [x])]  # noqa: E731
    a, b = flat(ours), flat(theirs)
    if len(a) != len(b):
        return float("nan")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def decisions_differ(task: str, ours: dict, their_lls: list, their_greedy: list | None) -> int:
    """Examples whose predicted choice (LAMBADA: greedy flag) differs between the implementations."""
    if TASK_SPECS[task].kind == "multiple_choice":
        theirs_pred = [max(range(len(x)), key=x.__getitem__) for x in their_lls]
        return sum(p != q for p, q in zip(ours["pred"], theirs_pred, strict=True))
    if their_greedy is not None:
        return sum(a != b for a, b in zip(ours["greedy"], their_greedy, strict=True))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR (a checkpoint directory)")
    ap.add_argument("--prompts-only", action="store_true", help="only compare the requests lm-eval builds (no model)")
    ap.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy", "lambada"])
    ap.add_argument("--limit", type=int, default=200, help="examples per task (lm-eval's --limit)")
    ap.add_argument("--wikitext-limit", type=int, default=3, help="WikiText-2 articles")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=None, help="context length for both (default: the config's)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="write everything here")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data_dir is None:
        sys.exit("no data directory: pass --data-dir or set T2R_EVAL_DATA")
    models = dict(m.split("=", 1) for m in args.model)
    if not models and not args.prompts_only:
        sys.exit("pass --model NAME=DIR (or --prompts-only)")
    work = Path(tempfile.mkdtemp(prefix="t2r_lm_eval_"))
    configs = {t: lm_eval_config(t, local_jsonl(t, data_dir, work)) for t in args.tasks}
    limits = {t: args.wikitext_limit if t == "wikitext2" else args.limit for t in args.tasks}
    report: dict = {
        "lm_eval_version": lm_eval.__version__,
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "limits": limits,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "models": models,
        "prompts": prompt_check(args.tasks, data_dir, work),
        "tasks": {},
    }
    for name, model_dir in models.items():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for limit in sorted(set(limits.values())):
            tasks = [t for t in args.tasks if limits[t] == limit]
            t0 = time.time()
            theirs = run_lm_eval(model_dir, [configs[t] for t in tasks], limit, args.batch_size, args.max_length)
            t_lm_eval = time.time() - t0
            t0 = time.time()
            ours = evaluate_tasks(
                {name: model},
                tokenizer,
                tasks,
                limit=limit,
                data_dir=data_dir,
                batch_size=args.batch_size,
                max_length=args.max_length,
                progress=False,
                details=True,
            )
            t_ours = time.time() - t0
            for t in tasks:
                lm_task = configs[t]["task"]
                their_metrics, their_lls, their_greedy = lm_eval_values(theirs, lm_task, t)
                mine = ours["tasks"][t]
                entry = report["tasks"].setdefault(t, {"lm_eval_task": lm_task, "n": mine["n"], "models": {}})
                details = mine["details"][name]
                entry["models"][name] = {
                    "t2r": {k: v for k, v in mine["scores"][name].items() if k != "n"},
                    "lm_eval": their_metrics,
                    "max_abs_loglikelihood_diff": compare_lls(details["loglikelihoods"], their_lls),
                    "decisions_differ": decisions_differ(t, details, their_lls, their_greedy),
                    "n_lm_eval": len(their_lls),
                }
            report.setdefault("seconds", {})[f"{name} {'+'.join(tasks)}"] = {
                "lm_eval": round(t_lm_eval, 1),
                "t2r": round(t_ours, 1),
            }
        del model
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def format_report(report: dict) -> str:
    lines = [
        f"lm-eval {report['lm_eval_version']}, torch {report['torch']}, {report['date']}, {report['machine']}",
        "requests lm-eval builds vs t2r's (all records; HellaSwag and MMLU: sample records):",
        *(f"  {task}: {json.dumps(entry)}" for task, entry in report["prompts"].items()),
        "| task | n | metric | model | t2r | lm-eval | diff | max per-request |Δll| | decisions differ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, entry in report["tasks"].items():
        for model, m in entry["models"].items():
            for metric, ours in m["t2r"].items():
                theirs = m["lm_eval"].get(metric)
                scale = 1 if metric in ("ppl", "word_perplexity", "byte_perplexity", "bits_per_byte") else 100
                diff = "-" if theirs is None else f"{scale * (ours - theirs):+.4f}"
                their_s = "-" if theirs is None else f"{scale * theirs:.4f}"
                lines.append(
                    f"| {task} | {entry['n']} | {metric} | {model} | {scale * ours:.4f} | {their_s} | {diff} | "
                    f"{m['max_abs_loglikelihood_diff']:.2e} | {m['decisions_differ']} |"
                )
    lines.append("accuracies in %; diff = t2r - lm-eval")
    lines.append("seconds: " + json.dumps(report.get("seconds", {})))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
