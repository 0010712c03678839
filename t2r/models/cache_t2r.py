"""Generation cache for converted models: fixed-size GSA memories per GSA layer, KV for full-attention layers.

transformers' own linear-attention cache layers are avoided on purpose: an all-linear cache breaks
``get_seq_length``, and its recurrent layer never marks a previous state. Here each GSA layer
counts the tokens it has seen, and that count answers every length query generate() and the mask builders ask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


class GSAStateLayer(CacheLayerMixin):
    """One GSA layer's memories (hk [B, Hkv, K, M], hv [B, Hkv, M, V], fp32) and its seen-token count."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # hybrid layers only
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a GSA layer keeps slot memories, not keys and values: use update_state()")

    def update_state(self, state: tuple[torch.Tensor, torch.Tensor], new_tokens: int, window=None) -> None:
        self.state = state
        self.window = window
        self.seen_tokens += new_tokens
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state[0].shape[0]

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = tuple(fn(x) for x in self.state)
        if self.window is not None:
            self.window = tuple(fn(x) for x in self.window)

    def offload(self) -> None:
        self._map(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        return None

    def reset(self) -> None:
        self.state = None
        self.window = None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("GSA memories cannot be rolled back token by token")

    def nbytes(self) -> int:
        held = (self.state or ()) + (self.window or ())
        return sum(x.numel() * x.element_size() for x in held)


class GSACache(Cache):
    """Per-layer cache of a converted model: :class:`GSAStateLayer` for GSA layers, the teacher's usual
    (dynamic or sliding-window) KV layer for layers left as softmax attention."""

    def __init__(self, config):
        kv_layers = DynamicCache(config=config).layers
        layers = [GSAStateLayer() if config.is_gsa_layer(i) else kv_layers[i] for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def gsa_layer(self, layer_idx: int) -> GSAStateLayer:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def nbytes(self) -> int:
        """Bytes held: constant in context length when every layer is GSA."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, GSAStateLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total
