"""An FLA-compatible copy of an exported checkpoint: flash-linear-attention's ``gsa`` model type and names.

FLA's GSA model (``fla.models.GSAForCausalLM``) is the same network as a converted Llama/Mistral when the
conversion kept FLA's conventions: no RoPE, swish or relu feature maps, slot-softmax scale 1, no biases, no
q/k norms, no hybrid window or full-attention layers, and q/k/v widths equal to the hidden size (FLA derives
head widths as hidden_size / num_heads). Then only tensor names and config keys differ; tensors are copied
bit for bit. Whether FLA's kernels give the same logits is checked on a GPU by
``benchmarks/gpu/fla_parity.py`` (FLA is never a t2r dependency).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from t2r.convert.sources import TOKENIZER_FILES
from t2r.errors import T2RError
from t2r.shards import ShardWriter, iter_tensors, parse_size, read_tensor_infos, shard_files

FLA_NAMES = [
    (re.compile(r"^model\.embed_tokens\."), "model.embeddings."),
    (re.compile(r"^model\.layers\.(\d+)\.input_layernorm\."), r"model.layers.\1.attn_norm."),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\."), r"model.layers.\1.mlp_norm."),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\."), r"model.layers.\1.attn."),
]


def fla_name(name: str) -> str:
    for pattern, replacement in FLA_NAMES:
        name, n = pattern.subn(replacement, name)
        if n:
            break
    return name


def fla_incompatibilities(config) -> list[str]:
    """Why this converted config cannot be expressed as FLA's GSA model (empty when it can)."""
    reasons = []
    head_dim = config.attention_head_dim
    if config.model_type not in ("t2r_llama", "t2r_mistral"):
        reasons.append(f"architecture {config.model_type} (FLA's GSA blocks match Llama/Mistral only)")
    if config.gsa_use_rope:
        reasons.append("RoPE on q/k (FLA's GSA has none)")
    if config.gsa_window or config.gsa_full_attention_layers:
        reasons.append("hybrid window or full-attention layers")
    if config.gsa_gate_bias:
        reasons.append("a gate bias (FLA's f_proj has none)")
    if config.gsa_feature_map not in ("swish", "relu"):
        reasons.append(f"feature map {config.gsa_feature_map}")
    if config.gsa_scale != 1.0:
        reasons.append(f"slot-softmax scale {config.gsa_scale} (FLA's model uses 1)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        reasons.append("projection biases")
    if config.hidden_act != "silu":
        reasons.append(f"MLP activation {config.hidden_act}")
    if config.num_attention_heads * head_dim != config.hidden_size:
        reasons.append(f"heads x head_dim = {config.num_attention_heads * head_dim} != hidden_size")
    return reasons


def fla_config(config) -> dict:
    return {
        "model_type": "gsa",
        "architectures": ["GSAForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "num_slots": config.gsa_num_slots,
        "gate_logit_normalizer": config.gsa_gate_logit_normalizer,
        "feature_map": config.gsa_feature_map,
        "hidden_act": "swish",
        "norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_short_conv": False,
        "use_output_gate": False,
        "use_norm": True,
        "elementwise_affine": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(config.dtype).removeprefix("torch.") if getattr(config, "dtype", None) else None,
    }


def check_fla_compatible(config) -> None:
    reasons = fla_incompatibilities(config)
    if reasons:
        raise T2RError("--format fla: this model cannot load in FLA's GSA: " + "; ".join(reasons))


def write_fla(export_dir: Path, out: Path, config, max_shard_size: str) -> int:
    """Write FLA's layout of the checkpoint in ``export_dir`` to ``out``; returns the number of tensors."""
    check_fla_compatible(config)
    out.mkdir(parents=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    count = 0
    for info, tensor in iter_tensors(read_tensor_infos(shard_files(export_dir))):
        writer.add(fla_name(info.name), tensor)
        count += 1
    writer.close()
    (out / "config.json").write_text(json.dumps(fla_config(config), indent=2) + "\n")
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (export_dir / name).is_file():
            shutil.copyfile(export_dir / name, out / name)
    return count
