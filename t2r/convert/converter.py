"""Teacher checkpoint -> GSA checkpoint, streamed shard by shard.

Every teacher tensor is copied unchanged (bit-identical unless --dtype asks for a cast); each GSA layer gains
``self_attn.f_proj.weight`` (slot gates), ``self_attn.g_norm.weight`` (ones) and, for hybrid layers,
``self_attn.window_mix.weight`` (per-head window share logits). Peak memory is one output
shard plus one tensor, whatever the model size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from t2r import __version__
from t2r.convert.sources import TOKENIZER_FILES, Source, resolve_source
from t2r.errors import T2RError
from t2r.fsutil import atomic_directory, check_destination
from t2r.models.configuration_t2r import FEATURE_MAPS, T2R_CONFIGS
from t2r.shards import DTYPES, ShardWriter, iter_tensors, parse_size, read_tensor_infos, shard_files

GATE_INITS = ("random", "kproj")
_LAYER_KPROJ = re.compile(r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$")


@dataclass
class ConvertOptions:
    slots: int = 64
    feature_map: str = "swish"
    rope: bool = False
    gate_init: str = "kproj"
    full_attention_layers: list[int] = field(default_factory=list)
    full_attention_auto: int = 0  # > 0: keep this many layers, those with the teacher's strongest retrieval heads
    dtype: str | None = None  # None keeps the teacher's dtype
    gate_logit_normalizer: float = 8.0
    gate_half_life_max: float = 0.0  # > 0: a per-slot gate bias spreading half-lives from the normalizer to this
    window: int = 0  # hybrid: sliding-window softmax attention over this many tokens inside each GSA layer
    window_mix_init: float = 2.0  # sigmoid(2) = 0.88 of each head from the window at first (see docs/results.md)
    window_mix_per_token: bool = False  # the window share also reads each token's hidden state (starts at zero)
    # The window also sees a virtual first token, its key and value from the teacher. None: on for hybrids (a
    # window without a sink collapses: docs/results.md, window sink).
    window_sink: bool | None = None
    seed: int = 0
    max_shard_size: str = "2GB"

    def __post_init__(self) -> None:
        if self.window_sink is None:
            self.window_sink = isinstance(self.window, int) and self.window > 0

    def validate(self, num_layers: int | None = None) -> None:
        if not isinstance(self.slots, int) or self.slots < 1:
            raise T2RError(f"--slots must be a positive integer, got {self.slots}")
        if self.feature_map not in FEATURE_MAPS:
            raise T2RError(f"--feature-map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.gate_init not in GATE_INITS:
            raise T2RError(f"--gate-init must be one of {', '.join(GATE_INITS)}, got {self.gate_init!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise T2RError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise T2RError(f"--window must be a non-negative integer, got {self.window}")
        if self.window_mix_per_token and not self.window:
            raise T2RError("--window-mix-per-token needs a hybrid (--window W)")
        if self.window_sink and not self.window:
            raise T2RError("--window-sink needs a hybrid (--window W)")
        if self.gate_half_life_max and not self.gate_half_life_max > self.gate_logit_normalizer:
            raise T2RError(
                f"--gate-half-life-max must be above the unbiased half-life of {self.gate_logit_normalizer:g} tokens "
                f"(or 0 for no gate bias), got {self.gate_half_life_max:g}"
            )
        if not isinstance(self.full_attention_auto, int) or self.full_attention_auto < 0:
            raise T2RError(f"--full-attention-layers auto:N needs a positive N, got {self.full_attention_auto}")
        if self.full_attention_auto and self.full_attention_layers:
            raise T2RError("--full-attention-layers takes either a list of layers or auto:N, not both")
        if len(set(self.full_attention_layers)) != len(self.full_attention_layers):
            raise T2RError(f"--full-attention-layers repeats a layer: {self.full_attention_layers}")
        if num_layers is not None:
            bad = [i for i in self.full_attention_layers if not 0 <= i < num_layers]
            if bad:
                raise T2RError(f"--full-attention-layers {bad} out of range: the model has {num_layers} layers")
            if self.full_attention_auto >= num_layers:
                raise T2RError(
                    f"--full-attention-layers auto:{self.full_attention_auto} would keep every layer: the model has "
                    f"{num_layers}"
                )
        parse_size(self.max_shard_size)


def parse_layer_list(text: str | None) -> list[int]:
    """'0,16' -> [0, 16]; '' or None -> []."""
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise T2RError(f"--full-attention-layers expects comma-separated integers or auto:N, got {text!r}") from None


def parse_full_attention(text: str | None) -> tuple[list[int], int]:
    """'0,16' -> ([0, 16], 0); 'auto:4' -> ([], 4): the layers, or how many to pick from the teacher."""
    if text and text.strip().startswith("auto"):
        _, sep, n = text.strip().partition(":")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise T2RError(f"--full-attention-layers auto:N needs a positive integer N, got {text!r}")
        return [], int(n)
    return parse_layer_list(text), 0


def gsa_config_from_teacher(teacher_config: dict, options: ConvertOptions):
    """The converted model's config: the teacher's fields plus the GSA settings."""
    model_type = teacher_config.get("model_type")
    if model_type not in T2R_CONFIGS:
        arch = ", ".join(teacher_config.get("architectures") or []) or "?"
        raise T2RError(f"unsupported architecture {model_type!r} ({arch}); supported: {', '.join(T2R_CONFIGS)}")
    fields = {
        k: v
        for k, v in teacher_config.items()
        if k not in ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config")
    }
    options.validate(teacher_config.get("num_hidden_layers"))
    cls = T2R_CONFIGS[model_type]
    config = cls(
        **fields,
        gsa_num_slots=options.slots,
        gsa_feature_map=options.feature_map,
        gsa_gate_logit_normalizer=options.gate_logit_normalizer,
        gsa_gate_bias=options.gate_half_life_max > 0,
        gsa_use_rope=options.rope,
        gsa_full_attention_layers=sorted(options.full_attention_layers),
        gsa_window=options.window,
        gsa_window_mix_init=options.window_mix_init,
        gsa_window_mix_per_token=options.window_mix_per_token,
        gsa_window_sink=options.window_sink,
    )
    config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    return config


def init_gate(config, layer_idx: int, k_proj: torch.Tensor | None, gate_init: str, seed: int) -> torch.Tensor:
    """f_proj weight [Hkv * M, hidden] for one layer.

    random: N(0, 0.02), as in the GSA paper's code. kproj: each KV head's key rows average-pooled onto the M
    slots (adaptive pooling: groups of rows when head_dim > M, repeated rows when head_dim < M), so gates start
    as pooled keys of the same token, as Liger does.
    """
    Hkv, M, D = config.num_key_value_heads, config.gsa_num_slots, config.hidden_size
    if gate_init == "random":
        gen = torch.Generator().manual_seed(seed * 100_003 + layer_idx)
        return torch.randn(Hkv * M, D, generator=gen) * config.initializer_range
    head_dim = k_proj.shape[0] // Hkv
    rows = k_proj.float().reshape(Hkv, head_dim, D).permute(0, 2, 1)  # [Hkv, D, head_dim]
    return F.adaptive_avg_pool1d(rows, M).permute(0, 2, 1).reshape(Hkv * M, D)


def init_gate_bias(config, max_half_life: float) -> torch.Tensor:
    """f_proj bias [Hkv * M]: slot m of every KV head gets a memory half-life (at zero gate input) log-spaced
    from the normalizer's own (bias 0: logsigmoid(0) / n = -ln 2 / n, so n tokens) up to ``max_half_life``.

    Why: with a bias-free f_proj the gates start near f = 0, so every slot forgets half of itself every ~8
    tokens (measured on converted SmolLM2: median 8, under 0.5% of slots beyond 500 tokens), and nothing can be
    carried across a 2k context until training pushes all gate logits to ~+5. Spreading half-lives gives the
    memory slow slots from the start, as fixed multi-scale decays do in retention-style models.
    """
    n, M = config.gsa_gate_logit_normalizer, config.gsa_num_slots
    half_lives = torch.logspace(math.log10(n), math.log10(max_half_life), M, dtype=torch.float64)
    keep = torch.exp2(-n / half_lives)  # sigmoid(bias): logsigmoid(bias) / n = -ln 2 / half-life
    return torch.logit(keep).float().repeat(config.num_key_value_heads)


def _count_params(infos) -> int:
    total = 0
    for info in infos:
        n = 1
        for d in info.shape:
            n *= d
        total += n
    return total


def convert(
    src: str,
    out: str | Path,
    options: ConvertOptions | None = None,
    *,
    force: bool = False,
    allow_download: bool = False,
    progress: bool = True,
) -> Path:
    """Convert SRC (alias, directory, hub id or .gguf) into a GSA checkpoint directory OUT (atomically)."""
    options = options or ConvertOptions()
    options.validate()
    out = check_destination(out, force)
    source = resolve_source(src, allow_download=allow_download)
    teacher_config = json.loads((source.path / "config.json").read_text())
    config = gsa_config_from_teacher(teacher_config, options)  # architecture and options checked before any work
    sink_token = None
    if options.window_sink:
        from t2r.convert.window_sink import sink_key_values, teacher_sink_token

        sink_token = teacher_sink_token(str(source.path))  # before any weights load
    selection = None
    if options.full_attention_auto:
        from t2r.convert.layer_select import select_full_attention_layers

        layers, selection = select_full_attention_layers(source.path, options.full_attention_auto, progress=progress)
        options = replace(options, full_attention_layers=layers, full_attention_auto=0)
        config = gsa_config_from_teacher(teacher_config, options)
    infos = read_tensor_infos(shard_files(source.path))
    _check_layout(infos, config)
    gsa_layers = [i for i in range(config.num_hidden_layers) if config.is_gsa_layer(i)]
    sink = sink_key_values(source.path, sink_token, gsa_layers) if sink_token is not None else None
    started = time.time()
    with atomic_directory(out, force=force) as tmp:
        stats = _write_weights(infos, config, options, tmp, progress, sink)
        _write_side_files(source, config, tmp)
        record = {
            "t2r_version": __version__,
            "source": source.provenance(),
            "teacher_model_type": teacher_config.get("model_type"),
            "options": asdict(options),
            "gsa_layers": gsa_layers,
            **({"full_attention_selection": selection} if selection else {}),
            **({"window_sink_token": sink_token} if sink_token is not None else {}),
            **stats,
            "seconds": round(time.time() - started, 1),
        }
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, config))
    return out


def _check_layout(infos, config) -> None:
    names = {i.name for i in infos}
    missing = [
        f"model.layers.{i}.self_attn.{p}_proj.weight"
        for i in range(config.num_hidden_layers)
        if config.is_gsa_layer(i)
        for p in "qkvo"
        if f"model.layers.{i}.self_attn.{p}_proj.weight" not in names
    ]
    if missing:
        raise T2RError(f"checkpoint lacks attention weights the config promises, e.g. {missing[0]}")
    clash = [n for n in names if ".f_proj." in n or ".g_norm." in n]
    if clash:
        raise T2RError(f"source already has GSA tensors ({clash[0]}); it looks converted already")


def _write_weights(infos, config, options: ConvertOptions, out_dir: Path, progress: bool, sink=None) -> dict:
    out_dtype = DTYPES.get(options.dtype) if options.dtype else None
    writer = ShardWriter(out_dir, parse_size(options.max_shard_size), metadata={"t2r": __version__})
    gsa_layers = [i for i in range(config.num_hidden_layers) if config.is_gsa_layer(i)]
    new_names: list[str] = []
    new_params = 0
    first_dtype = None
    bar = tqdm(total=len(infos), unit="tensor", desc="convert", disable=not progress)
    for info, tensor in iter_tensors(infos):
        first_dtype = first_dtype or tensor.dtype
        writer.add(info.name, tensor if out_dtype is None else tensor.to(out_dtype))
        m = _LAYER_KPROJ.match(info.name)
        if m and int(m.group(1)) in gsa_layers:
            idx = int(m.group(1))
            dtype = out_dtype or tensor.dtype
            prefix = f"model.layers.{idx}.self_attn"
            gate = init_gate(config, idx, tensor, options.gate_init, options.seed).to(dtype)
            norm = torch.ones(config.num_attention_heads * config.attention_head_dim, dtype=dtype)
            new = [(f"{prefix}.f_proj.weight", gate), (f"{prefix}.g_norm.weight", norm)]
            if config.gsa_gate_bias:
                new.append((f"{prefix}.f_proj.bias", init_gate_bias(config, options.gate_half_life_max).to(dtype)))
            if config.gsa_window:
                mix = torch.full((config.num_attention_heads,), config.gsa_window_mix_init, dtype=dtype)
                new.append((f"{prefix}.window_mix.weight", mix))
                if config.gsa_window_mix_per_token:
                    router = torch.zeros(config.num_attention_heads, config.hidden_size, dtype=dtype)
                    new.append((f"{prefix}.window_mix.proj.weight", router))
                if sink is not None:
                    new += [(f"{prefix}.window_sink.key", sink[idx][0].to(dtype)),
                            (f"{prefix}.window_sink.value", sink[idx][1].to(dtype))]  # fmt: skip
            for name, t in new:
                writer.add(name, t)
                new_names.append(name)
                new_params += t.numel()
        bar.update(1)
        bar.set_postfix_str(info.shard.name, refresh=False)
    bar.close()
    shards = writer.close()
    config.dtype = out_dtype or first_dtype
    teacher_params = _count_params(infos)
    return {
        "tensors_reused": len(infos),
        "tensors_new": len(new_names),
        "new_tensor_names": new_names,
        "params_teacher": teacher_params,
        "params_new": new_params,
        "params_total": teacher_params + new_params,
        "output_shards": [p.name for p in shards],
        "output_bytes": writer.total_bytes,
    }


def _write_side_files(source: Source, config, out_dir: Path) -> None:
    from t2r.models.modeling_t2r import save_remote_code

    save_remote_code(config, out_dir)
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out_dir / name)


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
        f"| slots | {opts['slots']} |",
        f"| feature map | {opts['feature_map']} |",
        f"| RoPE on q/k | {opts['rope']} |",
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
