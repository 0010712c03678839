"""What the kernel sweeps beside it share (window_tiles.py, grouped_tiles.py): a call timed from a CUDA graph, the
relative error, and the closing report (the fastest row per group, the rows as JSON)."""

from __future__ import annotations

import json

import torch

from t2r.bench import kernels

STEPS = 30  # calls captured in one graph


def graphed_ms(fn) -> float:
    """Milliseconds per call of ``fn`` replayed from a graph of STEPS calls (no host time; L2 stays warm)."""
    return kernels.graphed_ms([fn], min_calls=STEPS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def report(rows: list[dict], keys: tuple[str, ...], path: str | None) -> None:
    """Print the fastest row ("ms") of each group of ``keys``; write every row to ``path`` when given."""
    groups = dict.fromkeys(tuple(r[k] for k in keys) for r in rows)
    for group in groups:
        best = min((r for r in rows if tuple(r[k] for k in keys) == group), key=lambda r: r["ms"])
        print(f"best {' '.join(f'{k}={v}' for k, v in zip(keys, group, strict=True))}: {best}")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
