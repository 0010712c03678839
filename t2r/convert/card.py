"""The README.md model card of a converted directory."""

from __future__ import annotations


def model_card(record: dict, config) -> str:
    src = record["source"]
    base = src.get("repo_id")
    opts = record["options"]
    front = ["---", "library_name: transformers", "tags: [t2r, gated-slot-attention, linear-attention, rnn]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    n_gsa, n_layers = len(record["gsa_layers"]), config.num_hidden_layers
    sel = record.get("full_attention_selection")
    chosen = f" (auto: the teacher's {len(sel['chosen'])} strongest retrieval layers)" if sel else ""
    lines = [
        *front,
        "",
        f"# {config.architectures[0]} converted by t2r {record['t2r_version']}",
        "",
        f"Converted from `{src.get('repo_id') or src['spec']}` ({src['kind']}"
        + (f", revision {src['revision']}" if src.get("revision") else "")
        + (f", GGUF sha256 {src['gguf_sha256'][:16]}…" if src.get("gguf_sha256") else "")
        + ").",
        f"{n_gsa} of {n_layers} layers use Gated Slot Attention; the others keep softmax attention.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| slots | {opts['num_slots']} |",
        f"| feature map | {opts['feature_map']} |",
        f"| RoPE on q/k | {opts['use_rope']} |",
        f"| gate init | {opts['gate_init']} |",
        f"| gate bias (half-lives up to) | {opts['gate_half_life_max'] or 'none'} |",
        f"| full-attention layers | {opts['full_attention_layers'] or 'none'}{chosen} |",
        f"| sliding window (hybrid) | {opts['window'] or 'off'} |",
        f"| window share per token | {'yes' if opts['window_mix_per_token'] else 'no'} |",
        f"| window sink token | {record.get('window_sink_token', 'none')} |",
        f"| parameters | {record['params_total']:,} ({record['params_new']:,} new) |",
        "",
        "**Not finetuned yet**: the new gate projections are untrained, so quality is far below the teacher",
        "until `t2r finetune` has run.",
        "",
        "```python",
        "import t2r  # or: from_pretrained(..., trust_remote_code=True) without t2r installed",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)
