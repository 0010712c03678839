"""The bytes a decoding step must move, from a model's shapes alone: every weight once, and each sequence's cache.

A decoding step streams its weights and its cache through memory, so these bytes over the device's bandwidth are
the floor under its time, and the teacher's bytes over GSA's are the largest speed-up any kernel can give at that
batch and context. `t2r bench generate` prints that ratio beside the measured one: where the measured ratio falls
short of a goal, this says whether a kernel could close the gap at all.
"""

from __future__ import annotations

from torch import nn

STATE_BYTES = 4  # GSA memories are fp32


def decode_step_bytes(model: nn.Module, batch: int, context: int) -> int:
    """Bytes one decoding step of ``batch`` sequences after ``context`` tokens reads and writes at least: each
    parameter once (tied weights once), and per sequence and layer: a softmax layer's keys and values (the
    teacher's sliding window caps them, as its cache does) plus the new token's; a GSA layer's two fp32 memories,
    read and written; a hybrid layer's window of keys and values as well."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights are one parameter
    itemsize = next(model.parameters()).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_token = 2 * config.num_key_value_heads * head_dim * itemsize  # one token's keys and values, one layer
    is_gsa = getattr(config, "is_gsa_layer", lambda i: False)
    total = weights
    for layer in range(config.num_hidden_layers):
        if not is_gsa(layer):
            total += batch * kv_token * (_kv_span(config, layer, context) + 1)
            continue
        slots = config.gsa_num_slots
        memories = config.num_key_value_heads * 2 * head_dim * slots * STATE_BYTES
        total += batch * 2 * memories
        if config.gsa_window:
            total += batch * kv_token * config.gsa_window  # the window's W - 1 tokens read, the new one written
    return total


def _kv_span(config, layer: int, context: int) -> int:
    """Tokens a softmax layer's cache holds after ``context``: all of them, or the sliding window (a layer typed
    "sliding_attention", or every layer of a config with a window and no layer types, as transformers' caches do)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    sliding = types[layer] == "sliding_attention" if types else bool(window)
    return min(context, window) if sliding and window else context
