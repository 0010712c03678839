"""Decoding steps replayed as CUDA graphs.

An eager decoding step of a small model is bound by the host: SmolLM2-135M's step keeps an H200 busy 2.6-2.8 ms of
its 23-28 ms, through some 1,400 kernel launches (docs/benchmarks.md). A GSA model's decoding state has a fixed size,
so its whole step (embedding, every layer, the LM head) can be captured once per batch size and replayed: one
launch per token. The captured step reads and writes fixed buffers; the cache's layers are pointed at them (one
copy after the prefill) and the inputs are copied in before each replay.

What keeps a replay exact: every value the step depends on lives in a captured buffer (token ids, positions, the
last column of the padding mask, the GSA memories and the hybrid's window, updated in place) and the cache's
Python-side counts are advanced after each replay. Graphs are dropped whenever the model's tensors move (``.to()``,
reassigned ``.data``) or one of its modules registers a module, parameter or buffer (peft adapters attached), and
a step that does not fit the captured one (another batch size, a softmax layer's growing KV cache, gradients,
training mode, extra outputs, a model split over devices or traced by the caller's torch.compile) runs eagerly.
``T2R_CUDA_GRAPHS=0`` or ``model.decode_graphs.enabled = False`` turns it off.

``emulate`` runs the same machinery without a GPU (tests): a "replay" reruns the captured call against the
capture-time cache, whose Python-side state is put back as it was at capture, so a step that read something
outside its buffers diverges from eager decoding as a real graph would.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cache_t2r import GSACache, GSAStateLayer
from .cuda_graphs import capture_after_warmup
from .hf_compat import CACHE_ARG

ENABLED_BY_DEFAULT = os.environ.get("T2R_CUDA_GRAPHS", "1") != "0"
COMPILE = os.environ.get("T2R_DECODE_COMPILE") or None  # e.g. "inductor"
# Dynamo compiles each layer's frames once per layer (their layer index is a constant): 30 layers need 30 entries.
COMPILE_RECOMPILE_LIMIT = 512
MAX_GRAPHS = 8  # captured batch sizes kept per model (each holds its buffers and the pool's activations)
# Keyword arguments a captured step accepts (with these values): anything else runs eagerly.
PLAIN_KWARGS = {"return_dict": (True, None), "output_attentions": (False, None), "output_hidden_states": (False, None)}

_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the modules of models with captured steps
_structure_version = 0  # bumped whenever one of them registers a module, parameter or buffer


def _registered(parent: nn.Module, *args: Any) -> None:
    global _structure_version
    if parent in _WATCHED:
        _structure_version += 1


nn.modules.module.register_module_module_registration_hook(_registered)
nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_buffer_registration_hook(_registered)


@dataclass
class _Step:
    """One captured step (one batch size): its buffers, the graph and whose cache the buffers now hold."""

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    states: list[tuple[torch.Tensor, torch.Tensor] | None]
    windows: list[tuple[torch.Tensor, ...] | None]
    logits: torch.Tensor | None = None
    graph: Any = None  # torch.cuda.CUDAGraph, or the emulated step's call
    shadow: GSACache | None = None
    shadow_seen: list[int] = field(default_factory=list)
    owner: Any = None  # weakref to the cache whose layers point at the buffers


class DecodeGraphs:
    """The decoding steps of one model, captured per batch size (see the module's docstring)."""

    def __init__(self, enabled: bool = ENABLED_BY_DEFAULT, emulate: bool = False, compile: str | None = COMPILE):
        self.enabled = enabled
        self.emulate = emulate
        self.compile = compile  # a torch.compile backend for the captured step (fused kernels, fewer launches)
        self.steps: dict[tuple, _Step] = {}
        self.failed: dict[tuple, str] = {}  # shapes whose capture failed, and why (they decode eagerly)
        self._tensors: list[torch.Tensor] = []
        self._pointers: list[int] = []
        self._version = -1
        self._busy = False
        self._pool = None

    def __deepcopy__(self, memo) -> DecodeGraphs:  # a copied model captures its own steps
        return DecodeGraphs(self.enabled, self.emulate, self.compile)

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled, "emulate": self.emulate, "compile": self.compile}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def reset(self) -> None:
        """Drop every captured step (the caches they hold keep their own copies of the memories)."""
        for step in self.steps.values():
            self._release(step)
        self.steps.clear()
        self.failed.clear()
        self._pool = None

    def takes(self, model: nn.Module, input_ids, inputs_embeds, labels, attention_mask, cache, logits_to_keep,
              kwargs: dict) -> bool:  # fmt: skip
        """Whether this forward is a decoding step a graph can run."""
        if not self.enabled or self._busy or input_ids is None or inputs_embeds is not None or labels is not None:
            return False
        if torch.compiler.is_compiling() or len(set(getattr(model, "hf_device_map", {}).values())) > 1:
            return False  # traced by the caller's torch.compile, or split over devices: one graph cannot hold it
        if input_ids.dim() != 2 or input_ids.shape[1] != 1 or not (input_ids.is_cuda or self.emulate):
            return False
        if model.training or torch.is_grad_enabled() or not isinstance(logits_to_keep, int):
            return False
        if attention_mask is not None and attention_mask.dim() != 2:
            return False
        if any(k not in PLAIN_KWARGS or v not in PLAIN_KWARGS[k] for k, v in kwargs.items()):
            return False
        if not isinstance(cache, GSACache) or not model._reads_no_causal_mask():
            return False
        for layer, decoder in zip(cache.layers, model.model.layers, strict=True):
            if not isinstance(layer, GSAStateLayer) or layer.state is None:
                return False
            if (layer.window is None) != (not decoder.self_attn.window):
                return False
        return self._key(input_ids, attention_mask) not in self.failed

    def _key(self, input_ids: torch.Tensor, attention_mask) -> tuple:
        mask = None if attention_mask is None else attention_mask.dtype
        autocast = torch.is_autocast_enabled(input_ids.device.type)
        # Buffers made under inference mode cannot be written outside it.
        return input_ids.shape[0], input_ids.device, mask, autocast, torch.is_inference_mode_enabled()

    def step(self, model: nn.Module, input_ids, position_ids, attention_mask, cache: GSACache) -> torch.Tensor | None:
        """Logits [B, 1, vocab] of one decoding step, replayed (captured at the first step of this shape); None when
        the step could not be captured (it then runs eagerly, as will later steps of its shape)."""
        self._check_tensors(model)
        key = self._key(input_ids, attention_mask)
        step = self.steps.get(key)
        if step is None:
            try:
                step = self._capture(model, input_ids, attention_mask, cache)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # a host sync or an op a graph cannot hold
                self.failed[key] = f"{type(err).__name__}: {err}"
                return None
            if len(self.steps) >= MAX_GRAPHS:
                self._release(self.steps.pop(next(iter(self.steps))))
            self.steps[key] = step
        self._adopt(step, cache)
        step.ids.copy_(input_ids)
        if position_ids is None:
            step.positions.fill_(cache.get_seq_length())
        else:
            step.positions.copy_(position_ids.expand_as(step.positions))
        if step.mask is not None:
            step.mask.copy_(attention_mask[:, -1:])
        self._replay(step)
        for layer in cache.layers:
            layer.seen_tokens += 1
        return step.logits.clone()

    def _check_tensors(self, model: nn.Module) -> None:
        """Drop the graphs when a tensor they read has moved or the model's structure may have changed."""
        if self._version == _structure_version and [t.data_ptr() for t in self._tensors] == self._pointers:
            return
        self.reset()
        _WATCHED.update(model.modules())
        self._tensors = [*model.parameters(), *model.buffers()]
        self._pointers = [t.data_ptr() for t in self._tensors]
        self._version = _structure_version

    def _capture(self, model: nn.Module, input_ids, attention_mask, cache: GSACache) -> _Step:
        def buffer_like(x: torch.Tensor) -> torch.Tensor:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)

        step = _Step(
            ids=input_ids.clone(),
            positions=torch.zeros_like(input_ids),
            mask=None if attention_mask is None else attention_mask[:, -1:].clone(),
            states=[tuple(buffer_like(x) for x in layer.state) for layer in cache.layers],
            windows=[None if layer.window is None else tuple(buffer_like(x) for x in layer.window)
                     for layer in cache.layers],
        )  # fmt: skip
        step.positions.fill_(cache.get_seq_length())
        shadow = GSACache(model.config)
        for layer, real, state, window in zip(shadow.layers, cache.layers, step.states, step.windows, strict=True):
            layer.update_state(state, real.seen_tokens, window)
        step.shadow = shadow

        ids, positions, mask = step.ids, step.positions, step.mask  # what a graph holds on to
        seen = [layer.seen_tokens for layer in shadow.layers]

        def forward() -> torch.Tensor:
            out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                        **{CACHE_ARG: shadow})  # fmt: skip
            return out.logits

        compiled = torch.compile(forward, backend=self.compile, dynamic=False) if self.compile else forward

        def call() -> torch.Tensor:
            for layer, n in zip(shadow.layers, seen, strict=True):  # every call sees the same cache (and guards)
                layer.seen_tokens = n
            return compiled()

        self._busy = True
        limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                self._record(step, call, input_ids.device)
        finally:
            self._busy = False
        for layer, state, window in zip(shadow.layers, step.states, step.windows, strict=True):
            if layer.state[0] is not state[0] or (window is not None and layer.window[0] is not window[0]):
                raise RuntimeError("a decoding step replaced its cached memories instead of updating them in place")
        step.shadow_seen = [layer.seen_tokens for layer in shadow.layers]
        return step

    def _record(self, step: _Step, call, device: torch.device) -> None:
        """Warm up and capture ``call`` (emulated: keep it to rerun)."""
        if self.emulate:
            step.logits = call()
            step.graph = call
            return
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        step.graph, step.logits = capture_after_warmup(call, 2, device, self._pool)

    def _replay(self, step: _Step) -> None:
        if not self.emulate:
            step.graph.replay()
            return
        self._busy = True
        try:
            step.logits = step.graph()
        finally:
            self._busy = False
        shadow = step.shadow.layers
        for layer, seen, state, window in zip(shadow, step.shadow_seen, step.states, step.windows, strict=True):
            layer.seen_tokens, layer.state, layer.window = seen, state, window  # as a graph leaves them

    def _adopt(self, step: _Step, cache: GSACache) -> None:
        """Point ``cache``'s layers at the step's buffers (copying its memories in), first giving the previous
        holder its own copies."""
        owner = step.owner() if step.owner is not None else None
        if owner is not None and owner is not cache:
            self._release(step)
        for layer, state, window in zip(cache.layers, step.states, step.windows, strict=True):
            if layer.state[0] is not state[0]:
                for buf, x in zip(state, layer.state, strict=True):
                    buf.copy_(x)
                layer.state = state
            if window is not None and layer.window[0] is not window[0]:
                for buf, x in zip(window, layer.window, strict=True):
                    buf.copy_(x)
                layer.window = window
        step.owner = weakref.ref(cache)

    @staticmethod
    def _release(step: _Step) -> None:
        """The step's buffers are about to be overwritten: the cache holding them gets copies."""
        owner = step.owner() if step.owner is not None else None
        if owner is None:
            return
        for layer, state, window in zip(owner.layers, step.states, step.windows, strict=True):
            if layer.state is not None and layer.state[0] is state[0]:
                layer.state = tuple(x.clone() for x in state)
            if window is not None and layer.window is not None and layer.window[0] is window[0]:
                layer.window = tuple(x.clone() for x in window)
        step.owner = None
