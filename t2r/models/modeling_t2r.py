"""Converted models: the teacher's own transformers model class with GSA in place of softmax attention.

Only the ``self_attn`` module of each converted layer changes; embeddings, MLPs, norms, the LM head and the
layers kept as full attention are the teacher's classes and weights. The GSA module adopts the teacher
attention's q/k/v/o projections (and Qwen3's q/k norms), so their names, shapes and biases match by
construction, and adds ``f_proj`` (slot gates) and ``g_norm`` (output norm), named as in FLA.

This file and its relative imports are copied next to saved weights for ``trust_remote_code``; the kernel
imports below are rewritten to sibling modules at save time (see ``write_remote_kernels``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from t2r.kernels.dispatch import (
    RECURRENT_MAX_TOKENS,
    gsa,
    gsa_decode_fused_,
    gsa_prologue,
    rotary,
    window_decode_,
)
from t2r.kernels.reference import log_forget_gate, mix_window

from .cache_t2r import GSACache
from .configuration_t2r import T2RLlamaConfig, T2RMistralConfig, T2RQwen2Config, T2RQwen3Config
from .decode_graphs import DecodeGraphs
from .fused import fuse_modules
from .hf_compat import CACHE_ARG, take_cache
from .projections import plain_linears, project
from .window_attention import sliding_window_attention


class DocumentRows(NamedTuple):
    """Rows holding several packed documents: where documents start, and the documents as packed sequences."""

    starts: torch.Tensor  # [B, T] bool
    cu_seqlens: torch.Tensor  # the documents' bounds in the flattened rows
    row_first: torch.Tensor  # document index of each row's first document
    row_last: torch.Tensor  # ... and of its last
    numbers: torch.Tensor  # [B, T] each token's document within its row (0, 1, ...): the hybrid window's bounds


def document_rows(
    position_ids: torch.Tensor | None, batch: int, length: int, always: bool = False
) -> DocumentRows | None:
    """The packed documents in a batch, or None when every row is one sequence (unless ``always``). Computed once
    per model forward (it waits for the device) and handed to every layer; a caller that planned the layout
    already (the graphed training step, on the host) passes it as ``gsa_documents``.

    Same rule as transformers' packed-sequence masks: a document starts wherever the position id does not
    continue the previous one (+1), and at the start of every row.
    """
    if position_ids is None or (length < 2 and not always):
        return None
    pos = position_ids.expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not always and not bool(starts[:, 1:].any()):
        return None
    begin = starts.reshape(-1).nonzero().squeeze(-1)
    cu_seqlens = torch.cat([begin, begin.new_tensor([batch * length])])
    row_first = (begin % length == 0).nonzero().squeeze(-1)
    row_last = torch.cat([row_first[1:] - 1, row_first.new_tensor([len(begin) - 1])])
    return DocumentRows(starts, cu_seqlens, row_first, row_last, starts.long().cumsum(dim=1) - 1)


class GSAAttention(nn.Module):
    """Gated Slot Attention in place of one decoder layer's softmax attention: q/k/v/o are the teacher's modules,
    ``f_proj`` (slot gates) and ``g_norm`` (output norm) are new; hybrids add the teacher's sliding-window
    attention, mixed per head (``window_mix``), with an optional virtual first token (``window_sink``)."""

    # The layer ignores the causal mask; whatever is attached to its call and reads the mask (a training hook)
    # sets this, so that the model keeps building it.
    reads_causal_mask: bool = False
    takes_neighbours = True  # forward() takes its decoder layer's input norm and residual (models/fused.py)

    def __init__(self, config, layer_idx: int, teacher_attn: nn.Module):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = teacher_attn.head_dim
        self.num_slots = config.gsa_num_slots
        self.gate_logit_normalizer = config.gsa_gate_logit_normalizer
        self.scale = config.gsa_scale
        self.use_rope = config.gsa_use_rope
        self.feature_map = config.gsa_feature_map  # a name of reference.FEATURE_MAPS
        # Reused teacher modules (same parameter names as in the teacher checkpoint).
        self.q_proj, self.k_proj = teacher_attn.q_proj, teacher_attn.k_proj
        self.v_proj, self.o_proj = teacher_attn.v_proj, teacher_attn.o_proj
        self.q_norm = getattr(teacher_attn, "q_norm", None)
        self.k_norm = getattr(teacher_attn, "k_norm", None)
        # New modules.
        self.f_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.num_slots, bias=config.gsa_gate_bias)
        self.g_norm = LlamaRMSNorm(self.num_heads * self.head_dim, eps=config.rms_norm_eps)
        # Hybrid: sliding-window softmax attention (the teacher's own q/k/v with RoPE) mixed per head with GSA.
        self.window = config.gsa_window
        router_inputs = config.hidden_size if config.gsa_window_mix_per_token else 0
        self.window_mix = WindowMix(self.num_heads, config.gsa_window_mix_init, router_inputs) if self.window else None
        use_sink = self.window and config.gsa_window_sink
        self.window_sink = WindowSink(self.num_kv_heads, self.head_dim) if use_sink else None
        self.window_scaling = teacher_attn.scaling  # the window branch is the teacher's own softmax attention

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        input_norm: nn.Module | None = None,
        residual: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """``input_norm`` (the decoder layer's norm, not yet applied to ``hidden_states``) and ``residual`` (added to
        the output): the layer's neighbours, taken into the projections' launches where they can be
        (``TUNING.fused_maps``, models/fused.py's decoder layer)."""
        cache = take_cache(kwargs, cache)  # transformers < 5.24 passes it as past_key_values
        B, T, _ = hidden_states.shape
        if input_norm is not None and self.window:  # the window's router reads the normalised input too
            hidden_states, input_norm = input_norm(hidden_states), None
        q, k, v, f = project(hidden_states, (self.q_proj, self.k_proj, self.v_proj, self.f_proj), norm=input_norm)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        f = f.view(B, T, self.num_kv_heads, self.num_slots)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope or self.window:
            cos, sin = position_embeddings
            q_rot, k_rot = rotary(q, k, cos, sin)
            if self.use_rope:
                q, k = q_rot, k_rot
        token_mask = kwargs.get("gsa_token_mask")
        keep = None if token_mask is None else token_mask[:, -T:]  # padding neither writes nor decays the memories

        layer_cache = None
        if cache is not None:
            if not hasattr(cache, "gsa_layer"):
                raise TypeError(f"converted models need a GSACache, got {type(cache).__name__}")
            layer_cache = cache.gsa_layer(self.layer_idx)
        docs = kwargs.get("gsa_documents")
        if layer_cache is None:  # training and cache-less forwards: all traceable by torch.compile
            inputs = gsa_prologue(q, k, v, f, self.feature_map, self.gate_logit_normalizer, keep)
            o, state = _gsa_rows(*inputs, self.scale, None, docs, final=False)
            o = F.silu(o)
        else:
            o, state = self._read_and_update_cached(q, k, v, f, keep, layer_cache, docs)
        o, norm = o.reshape(B, T, -1), self.g_norm  # the norm goes with the output projection where it can
        window = None
        if self.window:
            o, norm = self.g_norm(o), None
            past = layer_cache.window if layer_cache is not None else None
            o = o.view(B, T, self.num_heads, -1)
            if past is not None and T == 1 and docs is None:  # decoding: one slot of the ring written in place
                mix = self.window_mix.terms(hidden_states)
                o = window_decode_(q_rot, k_rot, v, past, keep, self.window_scaling, o, *mix)
                window = past
            else:  # the ring, when one is made, keeps the sink in its slot 0 for decoding
                sink = self.window_sink(k_rot) if self.window_sink is not None else None
                doc = None if docs is None else docs.numbers
                valid = None if keep is None else keep.bool()
                o_win, window = sliding_window_attention(
                    q_rot,
                    k_rot,
                    v,
                    self.window,
                    self.window_scaling,
                    valid,
                    doc,
                    past,
                    sink=sink,
                    masks=kwargs.get("gsa_window_masks"),
                    carry=layer_cache is not None,
                )
                if past is not None:  # the window stays in its buffers, where a captured decoding step reads it
                    for old, new in zip(past, window, strict=True):
                        old.copy_(new)
                    window = past
                o = mix_window(o, o_win, self.window_mix(hidden_states))
            o = o.reshape(B, T, -1)
        if layer_cache is not None:
            layer_cache.update_state(state, T, window)
        (out,) = project(o, (self.o_proj,), norm=norm, residual=residual)
        return out, None

    def log_forget_gate(self, f: torch.Tensor) -> torch.Tensor:
        """log alpha (fp32) from the slot-gate logits f = f_proj(x); benchmarks/inspect_memory.py reads it."""
        return log_forget_gate(f, self.gate_logit_normalizer)

    @torch.compiler.disable
    def _read_and_update_cached(self, q, k, v, f, keep, layer_cache, docs: DocumentRows | None):
        """A forward with a cache (prefill or decoding): (silu(o), the new state). Outside torch.compile graphs: the
        cache is Python state, and decoding updates it in place, one fused launch per layer on the GPU."""
        state = layer_cache.state
        args = self.feature_map, self.gate_logit_normalizer, keep
        if docs is None and state is not None and q.shape[1] <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled():
            return gsa_decode_fused_(q, k, v, f, self.scale, state, *args), state
        o, state = _gsa_rows(*gsa_prologue(q, k, v, f, *args), self.scale, state, docs, final=True)
        return F.silu(o), state


class WindowSink(nn.Module):
    """A virtual first token every window query also attends to: its key (as at position 0, after RoPE) and raw
    value per KV head. A softmax layer cut off from its first tokens collapses (StreamingLLM), and a fixed token
    in their place serves as well as the real ones (docs/results.md). Being a constant, it needs no cache, works
    for packed documents and left padding alike, and decoding stays constant-size. t2r convert --window-sink
    takes it from the teacher (one token through the model); training may move it."""

    def __init__(self, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.key = nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        self.value = nn.Parameter(torch.zeros(num_kv_heads, head_dim))

    def forward(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) in ``like``'s dtype. Called with a tensor, not read, so that peft's modules_to_save wrapper
        (whose forward takes an input) applies."""
        return self.key.to(like.dtype), self.value.to(like.dtype)


class WindowMix(nn.Module):
    """Logit of the hybrid's mixing weight, per head: sigmoid(logit[h]) of head h comes from the window.

    Per head only (``hidden_size`` 0), or plus a linear read of each token's hidden state, so that a token can
    turn to the memories when its window lacks what it needs (``proj`` starts at zero: the per-head mix)."""

    def __init__(self, num_heads: int, init: float, hidden_size: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_heads,), float(init)))
        self.proj = nn.Linear(hidden_size, num_heads, bias=False) if hidden_size else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mix logits in fp32: [H], or [B, T, H] per token."""
        if self.proj is None:
            return self.weight.float()
        return self.weight.float() + self.proj(hidden_states).float()

    def terms(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits, read's weight, its input), the mix in the fused window step's terms: its kernel makes the
        per-token read itself where ``proj`` is a plain linear map (not one peft wraps), saving a GEMV and two
        elementwise launches per layer and token; otherwise the logits are made here."""
        proj = self.proj
        if proj is None:
            return self.weight, None, None
        if proj.bias is None and plain_linears((proj,)):
            return self.weight, proj.weight, hidden_states
        return self(hidden_states), None, None


def _gsa_rows(q, k, v, s, g, scale, state, docs: DocumentRows | None, final: bool):
    """The GSA op over the layer's rows: (o, the rows' new states if ``final``). Rows holding several documents
    run as packed sequences, so each document starts from a zero state; a row's first document continues from the
    row's state, and the row's last document's final state becomes the row's new state."""
    if docs is None:
        return gsa(q, k, v, s, g, scale, state, output_final_state=final)
    B, T = docs.starts.shape
    Hkv, K, M, V = k.shape[2], k.shape[3], s.shape[3], v.shape[3]
    init = None
    if state is not None:
        n = len(docs.cu_seqlens) - 1
        init = (
            q.new_zeros(n, Hkv, K, M, dtype=torch.float32).index_copy(0, docs.row_first, state[0]),
            q.new_zeros(n, Hkv, M, V, dtype=torch.float32).index_copy(0, docs.row_first, state[1]),
        )
    packed = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, s, g))
    o, last = gsa(*packed, scale, init, output_final_state=final, cu_seqlens=docs.cu_seqlens)
    o = o.reshape(B, T, *o.shape[2:])
    return o, ((last[0][docs.row_last], last[1][docs.row_last]) if final else None)


KERNEL_IMPORT = re.compile(r"^from t2r\.kernels\.(\w+) import", flags=re.MULTILINE)


def write_remote_kernels(save_directory: str | Path) -> None:
    """Make a saved directory self-contained: copy the GSA kernel modules beside the modeling code and point
    its ``t2r.kernels`` imports at them, so ``trust_remote_code`` loads work without t2r installed."""
    save_directory = Path(save_directory)
    kernels_dir = Path(gsa.__code__.co_filename).parent
    for src in sorted(p for p in kernels_dir.glob("*.py") if p.name != "__init__.py"):
        dest = save_directory / src.name
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
    for path in save_directory.glob("*.py"):
        text = path.read_text()
        fixed = KERNEL_IMPORT.sub(r"from .\1 import", text)
        if fixed != text:
            path.write_text(fixed)


def save_remote_code(config, save_directory: str | Path) -> None:
    """Write config.json (with auto_map) and the modeling code for ``config`` without building weights."""
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        model = T2R_MODELS[type(config)](config)
    custom_object_save(model, save_directory, config=config)
    config.save_pretrained(save_directory)
    write_remote_kernels(save_directory)


class T2RModelMixin:
    """Swaps attention for GSA after the teacher's class builds itself; wires the GSA cache into forward and
    generate(); makes saved directories self-contained."""

    def __init__(self, config):
        super().__init__(config)
        for idx, layer in enumerate(self.model.layers):
            if config.is_gsa_layer(idx):
                layer.self_attn = GSAAttention(config, idx, layer.self_attn)
        self.decode_graphs = DecodeGraphs()
        fuse_modules(self)  # fused norms and MLPs: a third of a decoding step's launches were the norms'
        self.post_init()  # initialises only the new modules: the others are already marked initialised

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        cache = take_cache(kwargs, cache)  # either name, on any supported transformers release
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = GSACache(self.config)
        graphs = self.decode_graphs
        if graphs.takes(self, input_ids, inputs_embeds, labels, attention_mask, cache, logits_to_keep, kwargs):
            logits = graphs.step(self, input_ids, position_ids, attention_mask, cache)
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, **{CACHE_ARG: cache})
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs["gsa_token_mask"] = attention_mask
        rows = input_ids if input_ids is not None else inputs_embeds
        if rows is not None and self._reads_no_causal_mask():
            # transformers' mask builders pass a prepared 4D mask through. An empty one spares a [T, context] mask
            # per prefill chunk, which made peak memory grow with the context (0.4 GB more at 128k than at 32k),
            # and in training the look at the position ids for packed rows, which waits for the device (and
            # under CUDA-graph capture, where it cannot wait, builds a [T, T] mask no layer reads).
            attention_mask = torch.ones(rows.shape[0], 1, 0, 0, dtype=torch.bool, device=rows.device)
        runs_gsa = any(isinstance(layer.self_attn, GSAAttention) for layer in self.model.layers)
        if rows is not None and runs_gsa and "gsa_documents" not in kwargs:  # one look at the positions (a wait)
            kwargs["gsa_documents"] = document_rows(position_ids, rows.shape[0], rows.shape[1])
        if self.config.gsa_window:  # the hybrid layers' window masks, built by the first and shared by the rest
            kwargs["gsa_window_masks"] = {}
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{CACHE_ARG: cache},
            **kwargs,
        )

    def train(self, mode: bool = True):
        """Back to training: captured decoding steps (their buffers and memory pool) are dropped."""
        if mode and getattr(self, "decode_graphs", None) is not None:
            self.decode_graphs.reset()
        return super().train(mode)

    def _reads_no_causal_mask(self) -> bool:
        """Every layer is GSA (its window builds its own masks from gsa_token_mask): no softmax layer kept, none
        swapped in and nothing attached that reads the mask (training runs layers as the teacher's attention)."""
        return all(
            isinstance(layer.self_attn, GSAAttention) and not layer.self_attn.reads_causal_mask
            for layer in self.model.layers
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(CACHE_ARG) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_ARG] = GSACache(self.config)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_kernels(save_directory)


class T2RLlamaForCausalLM(T2RModelMixin, LlamaForCausalLM):
    config_class = T2RLlamaConfig


class T2RMistralForCausalLM(T2RModelMixin, MistralForCausalLM):
    config_class = T2RMistralConfig


class T2RQwen2ForCausalLM(T2RModelMixin, Qwen2ForCausalLM):
    config_class = T2RQwen2Config


class T2RQwen3ForCausalLM(T2RModelMixin, Qwen3ForCausalLM):
    config_class = T2RQwen3Config


T2R_MODELS: dict[type, type] = {
    T2RLlamaConfig: T2RLlamaForCausalLM,
    T2RMistralConfig: T2RMistralForCausalLM,
    T2RQwen2Config: T2RQwen2ForCausalLM,
    T2RQwen3Config: T2RQwen3ForCausalLM,
}

for _config_cls, _model_cls in T2R_MODELS.items():
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForCausalLM")
