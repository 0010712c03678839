"""Where a step's time goes: the device's busy time and its kernels by family, beside the step's wall time.

A small model's training step is bound by its host, not its kernels (docs/benchmarks.md). A tokens/s ratio then
says little about what faster kernels or fewer launches would buy; the busy time does. Both models' busy times
come from the same run as their wall times, so the ratio's ceiling (both sides at their device time, as CUDA
graphs would run them) is measured, not estimated.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable

import torch

# Checked in this order; a kernel's family is the first whose pattern its name matches.
FAMILIES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|wgmma", re.I)),
    ("inductor", re.compile(r"^triton_")),  # torch.compile's generated kernels
)
_FAMILY_ORDER = ("gsa", "t2r", *(label for label, _ in FAMILIES), "other")  # the columns, in this order


@functools.cache
def _gsa_kernels() -> frozenset[str]:
    """The chunked GSA op's Triton kernels, by name (what the profiler calls them)."""
    try:
        from t2r.kernels import chunk_jit
    except ImportError:  # no triton: no GSA kernel can have run
        return frozenset()
    return frozenset(name for name in vars(chunk_jit) if name.endswith("_kernel"))


def family(name: str) -> str:
    """``gsa`` (the chunked GSA op), ``t2r`` (our other Triton kernels: norms, prologue, MLP, RoPE, decoding),
    ``attention``, ``gemm``, ``inductor`` or ``other`` (elementwise, reductions, copies)."""
    if name in _gsa_kernels():
        return "gsa"
    if re.fullmatch(r"_\w+_kernel", name):
        return "t2r"
    return next((label for label, pattern in FAMILIES if pattern.search(name)), "other")


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals (overlapping or nested ones count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def _t2r_functions() -> frozenset[str]:
    """Our autograd Functions' names, forward and backward, as the profiler records them (those imported so far:
    a step that ran one has imported it)."""
    names = {c.__name__ for c in torch.autograd.Function.__subclasses__() if c.__module__.startswith("t2r.")}
    return frozenset(names | {f"{name}Backward" for name in names})


def host_summary(events: Iterable[tuple[str, float, float]], steps: int) -> dict:
    """Per step, the host's time inside our autograd Functions (GSA op, fused norms, prologue, MLP), forward and
    backward, with their Triton launches (ms; under the profiler, which adds some). ``events``: the host's
    (name, start, end) in microseconds; the autograd engine's wrapper and the node nested in it count once."""
    ours = _t2r_functions()
    prefix = "autograd::engine::evaluate_function: "
    spans = [(start, stop) for name, start, stop in events if name.removeprefix(prefix) in ours]
    return {"t2r_host_ms": round(_union_us(spans) / steps / 1e3, 3)}


def busy_summary(kernels: Iterable[tuple[str, float, float]], steps: int) -> dict:
    """Per step: the device's busy time (the union of the kernels' [start, end] intervals, in ms: overlapping
    kernels count once), the number of kernels, and the kernels' own time by family (ms; these may add up to
    more than the busy time where kernels overlap). ``kernels``: (name, start, end) in microseconds."""
    kernels = list(kernels)
    by_name: dict[str, list[float]] = {}  # name: [time, launches]
    for name, start, stop in kernels:
        total = by_name.setdefault(name, [0.0, 0])
        total[0] += stop - start
        total[1] += 1
    by_family: dict[str, float] = {}
    for name, (us, _) in by_name.items():  # a name's family once, not once per launch
        label = family(name)
        by_family[label] = by_family.get(label, 0.0) + us
    busy = _union_us((start, stop) for _, start, stop in kernels)
    row = {"gpu_ms": round(busy / steps / 1e3, 3), "kernels": round(len(kernels) / steps)}
    row |= {f"{label}_ms": round(by_family.get(label, 0.0) / steps / 1e3, 3) for label in _FAMILY_ORDER}
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP]
    row["top_kernels"] = [
        {"kernel": short_name(name), "family": family(name), "ms": round(us / steps / 1e3, 3), "calls": n / steps}
        for name, (us, n) in top
    ]
    return row


TOP = 12  # kernels listed by their time per step (JSON only: what a family's time is made of)


def short_name(name: str) -> str:
    """A kernel's name without C++ return type, namespaces' noise and template arguments (CUDA's names run to
    hundreds of characters)."""
    name = name.removeprefix("void ")
    name = re.sub(r"<.*", "", name)  # template arguments and everything after
    return name.removeprefix("at::native::")[:80]


def check_profile(device: str) -> None:
    """Before a benchmark runs: a profile of GPU kernels needs the run to be on a GPU."""
    from t2r.devices import resolve_device
    from t2r.errors import T2RError

    if torch.device(resolve_device(device)).type != "cuda":
        raise T2RError(f"--profile measures the GPU's busy time; the run is on {device!r}: give a CUDA device")


def profile_steps(step: Callable[[], None], steps: int) -> dict:
    """Run ``step`` ``steps`` times on the GPU under torch's profiler: :func:`busy_summary` of the device's
    kernels, and the wall time per step of the profiled steps (``profiled_step_ms``; the profiler adds host
    time of its own, so tokens/s come from the unprofiled steps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = [(e.name, e.time_range.start, e.time_range.end, e.device_type) for e in prof.events()]
    kernels = [event[:3] for event in events if event[3] == DeviceType.CUDA]
    host = [event[:3] for event in events if event[3] == DeviceType.CPU]
    row = {"profiled_step_ms": round(wall / steps * 1e3, 2)} | busy_summary(kernels, steps)
    return row | host_summary(host, steps)
