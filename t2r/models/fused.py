"""The converted model's teacher modules with fused forwards: Llama-family RMSNorms and SwiGLU MLPs keep their class
(isinstance), parameters and names, and gain a forward that calls our fused kernels (t2r.kernels.dispatch) where
they apply and the same math in PyTorch everywhere else. A module is swapped only where its forward is the Llama
module's own (by source), so a family with other math, or a forward a hub kernel replaced, is left alone."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers import activations
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

from t2r.kernels.dispatch import rms_norm
from t2r.kernels.tuning import TUNING

from .projections import plain_rms_norm, project


class FusedRMSNorm:
    """Mixed in before a Llama-family RMSNorm class."""

    llama_rms_norm = True  # Llama's math (projections.plain_rms_norm)

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FusedMLP:
    """Mixed in before a Llama-family MLP class with a silu activation: gate and up as one GEMM where
    :func:`projections.project` merges them (or one grouped launch when decoding), silu(gate) * up in one launch
    where :func:`dispatch.swiglu` fuses it (or in gate and up's grouped launch: ``TUNING.fused_maps``),
    down through :func:`projections.project` too."""

    def forward(self, x):
        return self.forward_between(x)

    def forward_between(self, x, norm: nn.Module | None = None, residual=None):
        """The MLP of ``norm(x)``, plus ``residual``: the decoder layer's neighbours (:class:`FusedDecoderLayer`)."""
        (act,) = project(x, (self.gate_proj, self.up_proj), norm=norm, glu=True)
        (out,) = project(act, (self.down_proj,), residual=residual)
        return out


class FusedDecoderLayer:
    """Mixed in before a Llama-family decoder layer whose attention is GSA: without autograd and with
    ``TUNING.fused_maps``, its two norms go into the launches of the projections that follow them and its two
    residual adds into the output and down projections' (models/projections.py): four launches a layer fewer when
    decoding. Otherwise, and for layers kept as softmax attention, transformers' own forward."""

    def forward(self, hidden_states, *args, **kwargs):
        if args or not self._fuses_neighbours():
            return super().forward(hidden_states, *args, **kwargs)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, input_norm=self.input_layernorm, residual=hidden_states, **kwargs
        )
        return self.mlp.forward_between(hidden_states, self.post_attention_layernorm, hidden_states)

    def _fuses_neighbours(self) -> bool:
        """Fused maps on, no autograd, a GSA attention and a fused MLP, Llama's norms, and no hooks on the
        attention or the MLP (a hook on the attention would see its output with the residual added)."""
        if not TUNING.fused_maps or torch.is_grad_enabled():
            return False
        attn, mlp, norms = self.self_attn, self.mlp, (self.input_layernorm, self.post_attention_layernorm)
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (attn, mlp))
        return (
            getattr(attn, "takes_neighbours", False)
            and isinstance(mlp, FusedMLP)
            and not hooked
            and all(plain_rms_norm(n) for n in norms)
        )


def _silu(act: nn.Module | None) -> bool:
    """Whether an activation module is plain silu: torch's, or transformers' own (ACT2FN["silu"])."""
    return type(act) in (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))


@functools.cache
def _source(fn) -> str | None:
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):  # no source to compare
        return None


@functools.cache
def _fused_class(cls: type, mixin: type, stock: type) -> type | None:
    """``cls`` with ``mixin``'s forward, or None where its forward is not ``stock``'s."""
    if issubclass(cls, mixin):
        return cls
    if _source(cls.forward) is None or _source(cls.forward) != _source(stock.forward):
        return None
    return type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


def fuse_modules(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm, silu MLP and decoder layer in ``model`` the fused forward; returns how
    many."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            fused = _fused_class(type(module), FusedRMSNorm, LlamaRMSNorm)
        elif name.endswith("MLP") and _silu(getattr(module, "act_fn", None)):
            fused = _fused_class(type(module), FusedMLP, LlamaMLP)
        elif name.endswith("DecoderLayer"):
            fused = _fused_class(type(module), FusedDecoderLayer, LlamaDecoderLayer)
        else:
            continue
        if fused is not None:
            module.__class__ = fused
            count += 1
    return count
