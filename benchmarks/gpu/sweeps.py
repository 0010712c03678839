"""What the kernel sweeps beside it share (window_tiles.py, grouped_tiles.py): a call timed from a CUDA graph, the
relative error, and the closing report (the fastest row per group, the rows as JSON)."""

from __future__ import annotations

import json

import torch

STEPS = 30  # calls captured in one graph


def graphed_ms(fn) -> float:
    """Milliseconds per call of ``fn`` replayed from a graph of STEPS calls (no host time)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (20 * STEPS)


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
