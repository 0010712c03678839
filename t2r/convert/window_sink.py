"""The hybrid window's virtual sink token, taken from the teacher (``t2r convert --window-sink``).

A token at position 0 attends only to itself, so its key and value in every layer depend on that token alone:
running the teacher on one token gives each layer's sink exactly as a real first token of that kind would look
to later queries (the key after the q/k norms and RoPE at position 0, the value before anything else)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from t2r.errors import T2RError, first_line
from t2r.shards import iter_tensors, read_tensor_infos, shard_files

SINK_TEXT = "\n"  # a newline serves as well as the real first token (docs/results.md)


def sink_token(tokenizer) -> int:
    """A newline's first token; where the vocabulary has none, the BOS or else the EOS token, nearly as good a
    sink (docs/results.md)."""
    ids = tokenizer(SINK_TEXT, add_special_tokens=False)["input_ids"]
    for token in (ids[0] if ids else None, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise T2RError("--window-sink: the tokenizer has no newline, BOS or EOS token to use as the sink")


def teacher_sink_token(source: str) -> int:
    """The sink token of the teacher at SOURCE (an HF directory), checked before any weights load."""
    from transformers import AutoTokenizer

    try:
        return sink_token(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as e:
        detail = first_line(e)
        raise T2RError(
            f"--window-sink needs the teacher's tokenizer to choose the sink token ({detail}); "
            "--no-window-sink converts the hybrid without a sink"
        ) from None


@torch.no_grad()
def sink_key_values(path: Path, token: int, layers: list[int]) -> dict[int, tuple]:
    """{layer: (key [Hkv, D], value [Hkv, D])} of TOKEN at position 0 through the teacher at PATH (an HF
    directory), in fp32.

    Streamed like the conversion itself: the decoder layers run one at a time, each loaded from the shards just
    before and dropped just after, so a 7B teacher never sits in memory whole (docs/benchmarks.md, conversion)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    infos = {info.name: info for info in read_tensor_infos(shard_files(path))}
    captured: dict[int, tuple] = {}

    def load(module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        names = [n for n, _ in module.named_parameters()]
        missing = [prefix + n for n in names if prefix + n not in infos]
        if missing:
            raise T2RError(f"--window-sink: the teacher's shards lack {missing[0]}")
        if any(True for _ in module.buffers()):  # not in the supported architectures: to_empty would leave junk
            raise T2RError(
                f"--window-sink: {type(module).__name__} has buffers the layer-by-layer sink pass cannot load"
            )
        module.to_empty(device="cpu")
        tensors = dict(iter_tensors([infos[prefix + n] for n in names]))
        module.load_state_dict({n: tensors[infos[prefix + n]] for n in names})
        return module

    def capture(idx):
        def hook(attn, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            shape = (1, 1, -1, attn.head_dim)
            k, v = attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            _, k = apply_rotary_pos_emb(k, k, cos, sin, unsqueeze_dim=2)
            captured[idx] = (k[0, 0].clone(), v[0, 0].clone())

        return hook

    if not layers:
        return captured
    body = model.model
    embedding = infos.get("model.embed_tokens.weight")
    if embedding is None:
        raise T2RError("--window-sink: the teacher's shards lack model.embed_tokens.weight")
    with safe_open(str(embedding.shard), framework="pt") as f:  # the one row, not the whole table
        hidden = f.get_slice(embedding.name)[token : token + 1].float()[None]
    position_ids = torch.zeros(1, 1, dtype=torch.long)
    rotary = type(body.rotary_emb)(config=config)  # its inverse frequencies are built, not stored
    position_embeddings = rotary(hidden, position_ids)
    wanted = set(layers)
    for i, layer in enumerate(body.layers[: max(layers) + 1]):
        load(layer, f"model.layers.{i}.")
        handle = layer.self_attn.register_forward_pre_hook(capture(i), with_kwargs=True) if i in wanted else None
        out = layer(hidden, position_ids=position_ids, position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
        if handle is not None:
            handle.remove()
        layer.to_empty(device="meta")
    return captured
