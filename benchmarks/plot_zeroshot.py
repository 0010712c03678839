"""The zero-shot table of docs/results.md from the GPU runs' JSON (benchmarks/gpu/zeroshot.sh), with two figures:

- ``zeroshot_recovery.png``: per task, the teacher beside each trained student (t2r eval's own plot).
- ``zeroshot_curve.png``: how far the goals are: held-out perplexity over the teacher's against training tokens
  (the trainer's in-domain split, every 60 steps) and passkey accuracy against the window, students beside the
  teacher with every layer windowed (benchmarks/window_ablation.py) and the share of keys inside the window.

The teacher's scores come from run Z1's eval (teacher beside the student); the later runs were evaluated alone on
the same device and code, so their recoveries are against those scores.

python benchmarks/plot_zeroshot.py docs/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from t2r.eval.zeroshot import format_table, plot_recovery, recovery

# run folder, eval JSON, label in the table, window (0: pure GSA)
RUNS = [
    ("ZB", "trained-B.json", "B: pure GSA", 0),
    ("Z1", "trained-C.json", "C: hybrid W=64", 64),
    ("ZW", "trained-W.json", "W: hybrid W=512", 512),
]


def passkey(root: Path, run: str, file: str) -> dict[int, float]:
    """Passkey accuracy (%) by context length."""
    rows = json.loads((root / run / file).read_text())["passkey"]["student"]
    return {r["context"]: 100 * r["accuracy"] for r in rows}


def combined(root: Path) -> dict:
    """One eval result holding the teacher (from Z1) and every run's student, so t2r's table and plot apply."""
    base = json.loads((root / "Z1" / "trained-C.json").read_text())["zeroshot"]
    out = {"models": ["teacher"], "settings": base["settings"], "tasks": {}}
    for name, entry in base["tasks"].items():
        out["tasks"][name] = {k: v for k, v in entry.items() if k != "scores"}
        out["tasks"][name]["scores"] = {"teacher": entry["scores"]["teacher"]}
    for run, file, label, _ in RUNS:
        zs = json.loads((root / run / file).read_text())["zeroshot"]
        out["models"].append(label)
        for name in out["tasks"]:
            out["tasks"][name]["scores"][label] = zs["tasks"][name]["scores"]["student"]
    out["recovery"] = recovery(out)
    return out


def held_out_curve(log: Path) -> tuple[float, list[tuple[float, float]]]:
    """The untouched teacher's held-out ppl, and (tokens in millions, the run's held-out ppl) from the calibrated
    model on (from the first trained point where nothing was calibrated)."""
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
    teacher = next(e["eval_ppl"] for e in evals if e["stage"] == "teacher")
    return teacher, [(e["tokens"] / 1e6, e["eval_ppl"]) for e in evals if e["stage"] not in ("teacher", "converted")]


def curve_figure(root: Path, png: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for run, _, label, _ in RUNS:
        teacher, points = held_out_curve(root / run / "log.jsonl")
        left.plot(*zip(*points, strict=True), marker="o", label=label)
    if (root / "T1" / "log.jsonl").is_file():  # the teacher finetuned on the same data (control run T1)
        _, points = held_out_curve(root / "T1" / "log.jsonl")
        left.plot(*zip(*points, strict=True), color="black", linestyle="--", label="teacher finetuned alike (T1)")
    left.axhline(teacher, color="black", linewidth=1, label=f"teacher, untouched ({teacher:.2f})")
    left.set(yscale="log", xlabel="training tokens (M)", ylabel="held-out perplexity (linuxdoc split)",
             title="In-domain perplexity vs training tokens")  # fmt: skip
    left.legend(fontsize=8)

    ctx = 2048
    right.plot([w for *_, w in RUNS], [passkey(root, r, f)[ctx] for r, f, _, _ in RUNS], marker="o",
               label="trained students (B, C, W; 100 prompts)")  # fmt: skip
    windowed = []
    for w, file in ((64, None), (512, "window_ablation_w512_smollm2_cpu.json"),
                    (1024, "window_ablation_w1024_smollm2_cpu.json")):  # fmt: skip
        if file and (root / file).is_file():
            rows = json.loads((root / file).read_text())["rows"]
            windowed.append((w, 100 * next(r for r in rows if r["keep"] == [])["passkey"][str(ctx)]))
    windowed.insert(0, (64, 0.0))  # window_ablation_smollm2_cpu.json: W=64, no layer kept, 0/10 (at 1k)
    right.plot(*zip(*windowed, strict=True), marker="s", label="teacher, every layer windowed (CPU, 10 prompts)")
    ws = [0, 64, 128, 256, 512, 768, 1024]
    right.plot(ws, [100 * min(1.0, w / ctx) for w in ws], color="grey", linestyle=":", label="keys inside the window")
    right.axhline(90, color="grey", linestyle="--", linewidth=1, label="goal: 90%")
    right.set(xlabel="window W (tokens)", ylabel=f"passkey accuracy at {ctx} tokens (%)",
              title="Retrieval comes only from the window", ylim=(-3, 103))  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(root: Path) -> None:
    result = combined(root)
    print(format_table(result))
    for run, file, label, _ in RUNS:
        ppl = json.loads((root / run / file).read_text())["ppl"]["student"]
        keys = " / ".join(f"{v:.0f}%" for v in passkey(root, run, file).values())
        windows = ", ".join(f"{w['ppl']:.2f} ({w['window']})" for w in ppl)
        print(f"{label}: passkey 1k / 2k / 4k {keys}; pydoc ppl {windows}")
    plot_recovery(result, root / "zeroshot_recovery.png")
    curve_figure(root, root / "zeroshot_curve.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results"))
