"""Shared helpers: tiny random teachers of each supported architecture and an error metric."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import t2r  # noqa: F401  (registers the converted architectures)
from t2r.modeling.configuration_t2r import T2R_CONFIGS

TEACHER_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}

TINY = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCH_EXTRA = {
    "llama": dict(num_key_value_heads=6),  # plain multi-head attention
    "mistral": dict(sliding_window=None),  # GQA, group 3
    "qwen2": dict(attention_bias=True),  # the family's q/k/v biases
    "qwen3": dict(head_dim=16),  # q/k norms
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def teacher_config(arch: str, **overrides):
    return TEACHER_CONFIGS[arch](**{**TINY, **ARCH_EXTRA[arch], **overrides})


def gsa_config(arch: str = "mistral", num_slots: int = 16, **gsa):
    teacher = teacher_config(arch).to_dict()
    teacher.pop("model_type", None)
    return T2R_CONFIGS[arch](**teacher, gsa_num_slots=num_slots, **gsa)


def tiny_gsa_model(arch: str = "mistral", seed: int = 0, **gsa):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gsa_config(arch, **gsa)).eval()
    # Larger gates than the N(0, 0.02) init so that decay actually varies across slots and tokens.
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "f_proj"):
                layer.self_attn.f_proj.weight.normal_(0, 0.5)
    return model


@pytest.fixture(params=sorted(TEACHER_CONFIGS))
def arch(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs each run; the seed is printed (shown on failure) and T2R_TEST_SEED replays it."""
    seed = int(os.environ.get("T2R_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"T2R_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return seed
