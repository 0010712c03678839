"""``torch.compile`` for converted models, one decoder layer at a time.

Per layer rather than the whole model: every layer has the same code, so one compiled graph serves them all
(parameters are graph inputs), FSDP2 shards layers that are already compiled, and gradient checkpointing
(applied around each layer by transformers) stays outside the graph. The GSA kernels are registered custom ops
(``kernels/gsa_triton.py``), so a training layer compiles to one graph around them and Inductor fuses what lies
on either side (feature maps, gates, the output norm, the MLP, residual adds). That is the small models' gain:
their steps are bound by the host time spent launching many small kernels. Forwards with a cache (generation)
and the PyTorch reference path run between graphs.
"""

from __future__ import annotations

from torch import nn

from .distributed import decoder_layers


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); returns ``model``."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend)
    return model
