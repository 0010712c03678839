"""A finetuning run on disk (RUN/run.json, typed), and how to rebuild its model.

The record names the converted model the run started from, the data, the recipe, an optional ``prelude`` (the
output-norm calibration done before training, a delta like a stage's) and what each finished stage left:
``delta`` (a safetensors file of the tensors it trained) or ``adapter`` (a peft LoRA adapter with the new
parameters as modules_to_save). The model after stage k is the base checkpoint plus the stage outputs applied in
order; export and the next stage both rebuild it this way, so no intermediate full copy of a large model is ever
written. run.json is the run's commit point: it is only ever replaced whole, and a stage counts as finished once
the record lists it (t2r.train.trainer describes the states a run moves through).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2r.errors import T2RError, first_line
from t2r.fsutil import atomic_write_text, confined
from t2r.models.loading import load_converted

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
STAGES_DIR = "stages"
NEW_PARAM_MARKERS = (".f_proj.", ".g_norm.", ".window_mix.", ".window_sink.")


@dataclass
class StageRecord:
    """What a finished stage (or the calibration prelude) left: its output, relative to the run directory."""

    name: str
    kind: str  # delta | adapter
    output: str
    train: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_weights: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)
    changes_teacher: bool = False
    rows: int = 0  # calibration only: rows it saw


@dataclass
class RunRecord:
    t2r_version: str
    model_dir: str
    data: list[str]
    recipe: dict[str, Any]
    eval_data: list[str] | None = None
    recipe_source: str | None = None  # the --recipe given (a file or a shipped name), for the resume check
    overrides: list[str] = field(default_factory=list)
    status: str = "running"  # running | done
    world_size: int = 1
    prelude: list[StageRecord] | None = None  # None until the calibration ran (or was skipped)
    stages_done: list[StageRecord] = field(default_factory=list)
    cursor: dict[str, int] = field(default_factory=dict)  # data position at the last finished stage
    tokens: int = 0
    teacher_eval: dict[str, Any] = field(default_factory=dict)
    converted_eval: dict[str, Any] = field(default_factory=dict)
    calibrated_eval: dict[str, Any] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def applied(self) -> list[StageRecord]:
        """Everything a rebuild applies, in order: the prelude, then the finished stages."""
        return [*(self.prelude or []), *self.stages_done]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def write(self, run_dir: str | Path) -> None:
        atomic_write_text(Path(run_dir) / RUN_FILE, self.to_json())

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> RunRecord:
        if not isinstance(raw, dict):
            raise T2RError(f"{where} is not a run record (a JSON object)")
        try:
            stages = {
                key: None if raw.get(key) is None else [StageRecord(**s) for s in raw[key]]
                for key in ("prelude", "stages_done")
            }
            names = {f.name for f in dataclasses.fields(cls)}
            record = cls(**{k: v for k, v in raw.items() if k in names and k not in stages},
                         prelude=stages["prelude"], stages_done=stages["stages_done"] or [])  # fmt: skip
        except TypeError as e:
            raise T2RError(f"{where} is not a valid run record ({first_line(e)})") from None
        if record.status not in ("running", "done"):
            raise T2RError(f"{where}: unknown status {record.status!r}")
        for stage in record.applied:
            if stage.kind not in ("delta", "adapter"):
                raise T2RError(f"{where}: stage {stage.name!r} has unknown kind {stage.kind!r}")
        return record


def read_run(run_dir: str | Path) -> RunRecord:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise T2RError(f"{run_dir} is not a t2r run (no {RUN_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise T2RError(f"{path} is not valid JSON ({first_line(e)})") from None
    record = RunRecord.from_dict(raw, str(path))
    for stage in record.applied:
        confined(run_dir, stage.output, f"{path}: stage {stage.name!r} output")
    return record


def stage_output(run_dir: str | Path, stage: StageRecord) -> Path:
    """A stage's output on disk; only paths inside the run directory are accepted."""
    return confined(run_dir, stage.output, f"stage {stage.name!r} output")


def apply_stage_outputs(model: nn.Module, run_dir: str | Path, stages: list[StageRecord]) -> nn.Module:
    """Apply finished stages' deltas and adapters (merged) in order."""
    for stage in stages:
        out = stage_output(run_dir, stage)
        if stage.kind == "delta":
            from safetensors.torch import load_file

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


def rebuild_model(run_dir: str | Path, upto: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    run = read_run(run_dir)
    done = run.stages_done if upto is None else run.stages_done[:upto]
    return apply_stage_outputs(load_converted(run.model_dir, dtype), run_dir, [*(run.prelude or []), *done])


def teacher_weights_changed(stages: list[StageRecord]) -> bool:
    """True once a finished stage changed weights the teacher uses (anything but the new GSA parameters)."""
    return any(s.kind == "adapter" or s.changes_teacher for s in stages)
