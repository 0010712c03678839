"""A finetuning run on disk, and how to rebuild its model.

RUN/run.json records the converted model the run started from, the recipe, an optional ``prelude`` (the
output-norm calibration done before training, a delta like a stage's) and what each finished stage left:
``delta`` (a safetensors file of the tensors it changed: the new GSA parameters, or everything for a full
finetune) or ``adapter`` (a peft LoRA adapter with the new parameters as modules_to_save). The model after
stage k is the base checkpoint plus the stage outputs applied in order; export and the next stage both rebuild
it this way, so no intermediate full copy of a large model is ever written.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from t2r.errors import T2RError
from t2r.fsutil import atomic_write_text
from t2r.models.loading import first_line, load_converted

RUN_FILE = "run.json"
NEW_PARAM_MARKERS = (".f_proj.", ".g_norm.", ".window_mix.", ".window_sink.")


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise T2RError(f"{run_dir} is not a t2r run (no {RUN_FILE})")
    return json.loads(path.read_text())


def write_run(run_dir: Path, run: dict) -> None:
    run["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(run, indent=2) + "\n")


def apply_stage_outputs(model: nn.Module, run_dir: Path, stages: list[dict]) -> nn.Module:
    """Apply finished stages' deltas and adapters (merged) in order."""
    for stage in stages:
        out = Path(run_dir) / stage["output"]
        if stage["kind"] == "delta":
            try:
                tensors = load_file(str(out))
            except Exception as e:
                raise T2RError(f"cannot read stage output {out}: {first_line(e)}") from None
            missing = set(tensors) - set(model.state_dict())
            if missing:
                raise T2RError(f"stage output {out} does not match the model (e.g. {sorted(missing)[0]})")
            model.load_state_dict(tensors, strict=False)
        else:
            from peft import PeftModel

            with quiet_peft_wrap():
                model = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    return model


@contextlib.contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` alias whenever it wraps a model: a
    FutureWarning about peft's code, not the user's, on every LoRA stage and rebuild."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def rebuild_model(run_dir: Path, upto: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    run = read_run(run_dir)
    done = run["stages_done"] if upto is None else run["stages_done"][:upto]
    return apply_stage_outputs(load_converted(run["model_dir"], dtype), run_dir, run.get("prelude", []) + done)


def teacher_weights_changed(stages: list[dict]) -> bool:
    """True once a finished stage changed weights the teacher uses (anything but the new GSA parameters)."""
    return any(s["kind"] == "adapter" or s.get("changes_teacher", False) for s in stages)
