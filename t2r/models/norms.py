"""The converted model's RMSNorms in one launch each when nothing differentiates them (decoding, prefill,
evaluation): the teacher's own norm modules keep their class, weights and names, and gain a forward that calls the
fused kernel (t2r.kernels.dispatch.rms_norm) where it applies and their own forward everywhere else."""

from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from t2r.kernels.dispatch import rms_norm


class FusedRMSNorm:
    """Mixed in before a Llama-family RMSNorm class (same math, checked by source in :func:`fuse_rms_norms`)."""

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


@functools.cache
def _fused_class(cls: type) -> type | None:
    """``cls`` with the fused forward, or None where its forward is not the Llama RMSNorm's math (another family's
    norm, or one whose forward a hub kernel replaced)."""
    if issubclass(cls, FusedRMSNorm):
        return cls
    try:
        same = inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)
    except (OSError, TypeError):  # no source to compare: leave it alone
        return None
    return type(f"Fused{cls.__name__}", (FusedRMSNorm, cls), {"__module__": cls.__module__}) if same else None


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm in ``model`` the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            fused = _fused_class(type(module))
            if fused is not None:
                module.__class__ = fused
                count += 1
    return count
