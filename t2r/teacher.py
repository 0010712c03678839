"""The teacher, in one place: its architecture's own model class over a converted checkpoint's tensors (no copy),
a frozen teacher loaded from a converted directory, or the original checkpoint with eager attention (whose
attention weights exist) for analysis. Training's teacher-forced views of the student are in
t2r.train.teacher_attention."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2r.models.loading import load_converted


def teacher_view(model: nn.Module) -> nn.Module:
    """The teacher architecture's own model class over the same parameter tensors (no copy)."""
    base_cls = next(c for c in type(model).__mro__[1:] if c.__module__.startswith("transformers.models"))
    fields = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("gsa_") and k not in ("model_type", "auto_map", "architectures")
    }
    config = base_cls.config_class(**fields)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        teacher = base_cls(config)
    teacher.load_state_dict(model.state_dict(), strict=False, assign=True)
    teacher.model.rotary_emb = model.model.rotary_emb  # non-persistent buffers are not in the state dict
    teacher.tie_weights()
    return teacher


def load_teacher(converted_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The teacher of a converted checkpoint, frozen: a model of its own (for KD once the student's weights
    have moved away from the teacher's, and for evaluation beside the student)."""
    return teacher_view(load_converted(converted_dir, dtype)).eval().requires_grad_(False)


def load_eager_teacher(spec: str):
    """(model, tokenizer) of SRC with eager attention, whose weights and masks are materialised tensors: for the
    analysis code that reads or edits them (t2r.convert.layer_select, benchmarks/window_ablation.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2r.convert.sources import resolve_source

    path = resolve_source(spec).path
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)
