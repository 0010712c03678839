"""The teacher's logits for distillation (KD)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from t2r.teacher import load_teacher
from t2r.train.distributed import unwrap
from t2r.train.teacher_attention import as_teacher


class Teacher:
    """While the teacher's weights are untouched (stages before any LoRA merge or full finetune), the student
    itself runs as the teacher: GSA layers swapped for their softmax twins and LoRA adapters disabled, so no second
    copy of the model is held. Otherwise a frozen teacher of its own (the converted checkpoint's tensors in the
    teacher's class), optionally on another device."""

    def __init__(self, model: nn.Module, shared: bool, model_dir: str, device: torch.device, dtype: torch.dtype):
        self.shared = shared
        self.model = model if shared else load_teacher(model_dir, dtype).to(device)
        self.device = next(self.model.parameters()).device

    @contextlib.contextmanager
    def _context(self, model: nn.Module) -> Iterator[None]:
        if not self.shared:
            yield
            return
        disable = getattr(unwrap(model), "disable_adapter", None)
        # Adapters first: peft looks for its layers, which the teacher's twins do not hold.
        with disable() if disable is not None else contextlib.nullcontext(), as_teacher(model):
            yield

    @torch.no_grad()
    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        runner = model if self.shared else self.model
        with self._context(runner):
            inputs = {k: batch[k].to(self.device) for k in ("input_ids", "position_ids")}
            return runner(**inputs, use_cache=False).logits

    @contextlib.contextmanager
    def as_teacher(self, model: nn.Module) -> Iterator[nn.Module]:
        """For evaluation of the teacher itself."""
        with self._context(model if self.shared else self.model):
            yield model if self.shared else self.model
