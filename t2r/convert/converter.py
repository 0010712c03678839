"""Teacher checkpoint -> GSA checkpoint, streamed shard by shard.

Every teacher tensor is copied unchanged (bit-identical unless --dtype asks for a cast); each GSA layer gains
``self_attn.f_proj.weight`` (slot gates), ``self_attn.g_norm.weight`` (ones) and, for hybrid layers,
``self_attn.window_mix.weight`` (per-head window share logits). Peak memory is one output
shard plus one tensor, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from t2r import __version__
from t2r.convert.card import model_card
from t2r.convert.gates import init_gate, init_gate_bias
from t2r.convert.options import ConvertOptions
from t2r.convert.sources import TOKENIZER_FILES, Source, resolve_source
from t2r.errors import T2RError
from t2r.fsutil import atomic_directory, check_destination, read_json_object
from t2r.models.configuration_t2r import T2R_CONFIGS
from t2r.shards import DTYPES, ShardWriter, iter_tensors, parse_size, read_tensor_infos, shard_files

_LAYER_KPROJ = re.compile(r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$")


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
    settings = dataclasses.replace(
        options.gsa_settings(),
        gate_bias=options.gate_half_life_max > 0,
        full_attention_layers=sorted(options.full_attention_layers),
    )
    cls = T2R_CONFIGS[model_type]
    config = cls(**fields, **{f"gsa_{name}": value for name, value in dataclasses.asdict(settings).items()})
    config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    return config


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
    check_destination(out, force)
    source = resolve_source(src, allow_download=allow_download)
    reads = [source.path, *([source.gguf_file] if source.gguf_file else [])]
    check_destination(out, force, reads)
    teacher_config = read_json_object(source.path / "config.json", "teacher config")
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
    with atomic_directory(out, force=force, reads=reads) as tmp:
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
    writer = ShardWriter(out_dir, parse_size(options.max_shard_size))
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
