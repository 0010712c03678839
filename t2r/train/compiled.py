"""``torch.compile`` for converted models, one decoder layer at a time.

Per layer rather than the whole model: every layer has the same code, so one compiled graph serves them all
(parameters are graph inputs), FSDP2 shards layers that are already compiled, and gradient checkpointing
(applied around each layer by transformers) stays outside the graph. The GSA kernels are registered custom ops
(``t2r/kernels/chunk.py``), so a training layer compiles to one graph around them and Inductor fuses what lies
on either side (feature maps, gates, the output norm, the MLP, residual adds). That is the small models' gain:
their steps are bound by the host time spent launching many small kernels. Forwards with a cache (generation)
and the PyTorch reference path run between graphs.

The trainer leaves attention-transfer stages eager: their loss collector keys each layer's error by its index,
which Dynamo would specialise on, compiling every layer separately (seen on the CPU: a recompile per layer).
"""

from __future__ import annotations

import torch
from torch import nn

from t2r.train.distributed import decoder_layers

# A layer's code legitimately compiles once per combination of training or evaluation (grad mode), attention mode
# (GSA, the teacher for KD), adapters on or off, inputs requiring grad or not, and a first new shape. Past Dynamo's
# default limit of 8 the layer silently runs eagerly for the rest of the process (a transfer then LoRA + KD run
# hit it while transfer stages were still compiled).
RECOMPILE_LIMIT = 64


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); returns ``model``. Raises Dynamo's
    recompile limit to at least ``RECOMPILE_LIMIT`` (never lowers it)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for layer in decoder_layers(model):
        layer.compile(backend=backend)
    return model
