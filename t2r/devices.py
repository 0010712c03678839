"""The one place a user's ``--device`` is checked, so that asking for a GPU the machine lacks is one clear line,
not a traceback from deep inside torch."""

from __future__ import annotations

import torch

from t2r.errors import T2RError


def resolve_device(device: str | None) -> str:
    """``device`` as given after checking it exists here; None means cuda when present, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise T2RError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise T2RError(f"--device {device}: this machine has no CUDA device (use --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise T2RError(f"--device {device}: this machine has {count} CUDA device(s)")
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` without an index is the current GPU, so ``cuda`` and ``cuda:0`` agree
    on a one-GPU process."""

    def index(dev: torch.device) -> int | None:
        if dev.type != "cuda" or dev.index is not None:
            return dev.index
        return torch.cuda.current_device() if torch.cuda.is_available() else 0

    return a.type == b.type and index(a) == index(b)
