"""docs/results/recovery.png: held-out perplexity against training tokens for the SmolLM2 runs, teacher beside;
docs/results/positions.png: pydoc perplexity by target position (teacher vs the runs evaluated by position).

python benchmarks/plot_results.py docs/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "A": "A: paper recipe (random gates, full FT, LM)",
    "B": "B: t2r (kproj, transfer, LoRA LM+KD), no calibration",
    "C": "C: B + SWA hybrid W=64, no calibration",
    "B2": "B2: B with output-norm calibration",
    "C2": "C2: C with calibration, window share 0.88 at start",
    "B3": "B3: B2 on the Triton kernels, 9.2M tokens",
    "C3": "C3: C2 on the Triton kernels, 9.2M tokens",
    "A2": "A2: paper recipe at 15.1M tokens",
    "B5": "B5: B3 with full finetuning (lr 2e-4), 15.1M tokens",
    "C4": "C4: C3 with full finetuning (lr 1e-4), 9.2M tokens",
    "C5": "C5: C3 with full finetuning (lr 2e-4), 15.1M tokens",
    "C6": "C6: C5 with KD only (no CE)",
    "C7": "C7: C5 + 20% recall rows",
    "C8": "C8: C7, answer loss x30",
    "C9": "C9: C5 with lr 4e-4",
    "T1": "T1: control, the teacher finetuned like C5",
    "C10": "C10: C9 on gates with half-lives up to 4096",
    "C11": "C11: C10 + 20% recall rows, answer loss x30",
    "C12": "C12: C10 with 128 slots",
    "C14": "C14: C10, window mix at lr 1e-2",
    "C15": "C15: C14 with a per-token window share",
    "C16": "C16: C15 with layers 22, 23 kept as softmax attention",
    "C17": "C17: C15 on 4096-token rows",
    "C18": "C18: C15 with layers 20-23 kept as softmax attention",
    "C19": "C19: C15 with a window sink (--window-sink)",
    "C20": "C20: C19 with 128 slots",
    "C19s1": "C19s1: C19 with seed 1",
}
EARLY = {"A", "B", "C", "B2", "C2"}  # the 1.57M-token runs on the reference path


def main(root: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    teacher = None
    for name, label in LABELS.items():
        log = root / name / "log.jsonl"
        if not log.is_file():
            continue
        evals = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
        teacher = next((e["eval_ppl"] for e in evals if e["stage"] == "teacher"), teacher)
        start = [
            e
            for e in evals
            if e["stage"] == ("calibrated" if any(x["stage"] == "calibrated" for x in evals) else "converted")
        ]
        pts = [(0, start[0]["eval_ppl"])] + [
            (e["tokens"] / 1e6, e["eval_ppl"])
            for e in evals
            if e["stage"] not in ("teacher", "converted", "calibrated")
        ]
        ax.plot(*zip(*pts, strict=True), marker="o", label=label, linestyle=":" if name in EARLY else "-")
    if teacher:
        ax.axhline(teacher, color="black", linewidth=1, label=f"teacher SmolLM2-135M-Instruct ({teacher:.2f})")
    ax.set(
        yscale="log",
        xlabel="training tokens (M)",
        ylabel="held-out perplexity (linuxdoc hash split)",
        title="Held-out recovery vs training tokens, H100, 2026-11-22/23",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "recovery.png", dpi=110)


def plot_positions(root: Path, window: int = 4096) -> None:
    """Where the gap to the teacher is: perplexity of each target-position range within ``window``-token windows."""
    curves = {}
    teacher = root / "teacher_positions.json"
    if teacher.is_file():
        curves["teacher SmolLM2-135M-Instruct"] = json.loads(teacher.read_text())["ppl"]["teacher"]
    for name, label in LABELS.items():
        path = root / name / "eval.json"
        if path.is_file():
            rows = json.loads(path.read_text())["ppl"]["student"]
            if "ppl_by_position" in rows[0]:
                curves[label] = rows
    if len(curves) < 2:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rows in curves.items():
        row = next(r for r in rows if r["window"] == window)
        spans = list(row["ppl_by_position"])
        ax.plot(range(len(spans)), list(row["ppl_by_position"].values()), marker="o", label=label)
    ax.set_xticks(range(len(spans)), spans)
    ax.set(
        yscale="log",
        xlabel=f"target position within a {window}-token window",
        ylabel="perplexity (pydoc, held out)",
        title="Where the student loses to the teacher: beyond the 64-token window",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "positions.png", dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    plot_positions(Path(sys.argv[1]))
