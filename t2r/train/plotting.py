"""PNG plots of a run: training losses against tokens, and held-out perplexity with the teacher's beside it."""

from __future__ import annotations

from pathlib import Path

from t2r.train.reporting import read_log


def plot_run(run_dir: Path, png: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(run_dir)
    png = png or Path(run_dir) / "loss.png"
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    train = [e for e in entries if e.get("type") == "train"]
    for key in ("loss", "ce", "kd", "transfer"):
        pts = [(e["tokens"] / 1e6, e[key]) for e in train if key in e]
        if pts and (key != "loss" or len({k for e in train for k in e if k in ("ce", "kd", "transfer")}) > 1):
            ax_loss.plot(*zip(*pts, strict=True), label=key, linewidth=1)
    ax_loss.set(xlabel="training tokens (M)", ylabel="loss", title="training loss", yscale="log")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend()
    evals = [e for e in entries if e.get("type") == "eval" and "eval_ppl" in e]
    student = [(e["tokens"] / 1e6, e["eval_ppl"]) for e in evals if e["stage"] not in ("teacher",)]
    teacher = [e["eval_ppl"] for e in evals if e["stage"] == "teacher"]
    if student:
        ax_ppl.plot(*zip(*student, strict=True), marker="o", label="GSA student")
    if teacher:
        ax_ppl.axhline(teacher[-1], color="black", linestyle="--", label=f"teacher ({teacher[-1]:.2f})")
    ax_ppl.set(xlabel="training tokens (M)", ylabel="held-out perplexity", title="recovery", yscale="log")
    if ax_ppl.get_legend_handles_labels()[0]:
        ax_ppl.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
