"""The hybrid window's virtual sink token, taken from the teacher (``t2r convert --window-sink``).

A token at position 0 attends only to itself, so its key and value in every layer depend on that token alone:
running the teacher on one token gives each layer's sink exactly as a real first token of that kind would look
to later queries (the key after the q/k norms and RoPE at position 0, the value before anything else)."""

from __future__ import annotations

import torch

from .errors import T2RError

SINK_TEXT = "\n"  # on SmolLM2 the newline sink was as good as the real first token (docs/results.md)


def sink_token(tokenizer) -> int:
    """A newline's first token; where the vocabulary has none, the BOS or else the EOS token (on SmolLM2 its
    end-of-text sink was within 1% of the newline's)."""
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
        detail = str(e).strip().splitlines()[0]
        raise T2RError(
            f"--window-sink needs the teacher's tokenizer to choose the sink token ({detail}); "
            "--no-window-sink converts the hybrid without a sink"
        ) from None


@torch.no_grad()
def sink_key_values(model, token: int, layers: list[int]) -> dict[int, tuple]:
    """{layer: (key [Hkv, D], value [Hkv, D])} of TOKEN at position 0 through the teacher MODEL (eager attention;
    ``t2r.sources.load_eager_teacher``), on CPU in fp32."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: dict[int, tuple] = {}

    def hook(idx):
        def capture(attn, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            shape = (1, 1, -1, attn.head_dim)
            k, v = attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            _, k = apply_rotary_pos_emb(k, k, cos, sin, unsqueeze_dim=2)
            captured[idx] = (k[0, 0].float().cpu(), v[0, 0].float().cpu())

        return capture

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        model(input_ids=torch.tensor([[token]], device=model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured
