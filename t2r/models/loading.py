"""Loading a converted (or exported) directory as its t2r model class, with one-line errors. Not copied into
checkpoints (the files there are only what ``trust_remote_code`` needs)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2r.errors import T2RError, first_line
from t2r.fsutil import read_json_object


def check_converted_dir(model_dir: str | Path) -> Path:
    """A directory written by t2r convert (or export), or a one-line error."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise T2RError(f"{model_dir} is not a model directory (no config.json)")
    model_type = read_json_object(model_dir / "config.json", "model config").get("model_type")
    if not str(model_type).startswith("t2r_"):
        raise T2RError(f"{model_dir} is not a converted t2r model (model_type {model_type!r}); run t2r convert first")
    return model_dir


def load_converted(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A converted checkpoint as its t2r model class (registered by ``import t2r``)."""
    from transformers import AutoModelForCausalLM

    import t2r.models.auto  # noqa: F401  (registers the converted architectures)

    model_dir = check_converted_dir(model_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except Exception as e:  # corrupt shards surface as several exception types
        raise T2RError(f"cannot load {model_dir}: {first_line(e)}") from None


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a converted (or exported) model. The converted architectures are registered
    first: otherwise transformers finds the directory's modeling code and stops to ask whether to run it (the
    command line imports the model classes only when it needs them)."""
    from transformers import AutoTokenizer

    import t2r.models.auto  # noqa: F401  (registers the converted architectures)

    return AutoTokenizer.from_pretrained(model_dir)


def load_config(model_dir: str | Path):
    """A converted (or exported) model's config, the converted architectures registered first (as above)."""
    from transformers import AutoConfig

    import t2r.models.auto  # noqa: F401

    return AutoConfig.from_pretrained(model_dir)
