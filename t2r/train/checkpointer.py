"""Checkpoints and stage outputs of a run, each written atomically (t2r.fsutil.atomic_path).

RUN/checkpoints/stage-NN/step-NNNNNNN/ holds a stage's trainable weights (safetensors), the optimizer state,
the RNG states and the train state (JSON): enough to continue bit for bit. Checkpoints belong to one stage; once
the run record lists the stage as finished they are stale and removed. Stage outputs (RUN/stages/NN-name...) hold
only what the stage trained.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from t2r import __version__
from t2r.errors import T2RError, first_line
from t2r.fsutil import atomic_path
from t2r.train.distributed import DistInfo, barrier, unwrap
from t2r.train.recipe import Stage
from t2r.train.run_record import STAGES_DIR, StageRecord

CKPT_DIR = "checkpoints"


@dataclass
class TrainState:
    stage: int = 0
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens: int = 0
    stage_tokens: int = 0
    stage_seconds: float = 0.0
    best: dict = field(default_factory=dict)


def _unaliased(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that alias an earlier tensor (tied embeddings), which safetensors refuses to write.

    On CUDA the CPU offload copies every tensor, so ties vanish; on CPU they stay shared. Loading with
    strict=False keeps the tie, so the dropped name comes back through its partner.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def _options(full: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=True)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only (gathered under FSDP: a collective, every rank calls it). Frozen tensors are left
    out even where a tie or a wrapper lists them under another name (a tied lm_head)."""
    sd = get_model_state_dict(model, options=_options())
    trained = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {name: t for name, t in sd.items() if name in trained}


class Checkpointer:
    def __init__(self, run_dir: Path, info: DistInfo, keep: int):
        self.run_dir, self.info, self.keep = Path(run_dir), info, max(1, keep)

    def stage_root(self, stage: int) -> Path:
        return self.run_dir / CKPT_DIR / f"stage-{stage:02d}"

    def latest(self, stage: int) -> Path | None:
        """The newest complete checkpoint of STAGE (temporaries never count)."""
        root = self.stage_root(stage)
        found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
        return found[-1] if found else None

    def save(self, wrapped: nn.Module, opt, sched, state: TrainState) -> None:
        model_sd = get_model_state_dict(unwrap(wrapped), options=_options())  # collectives under FSDP
        opt_sd = get_optimizer_state_dict(unwrap(wrapped), opt, options=_options())
        if self.info.is_main:
            root = self.stage_root(state.stage)
            with atomic_path(root / f"step-{state.global_step:07d}", directory=True) as tmp:
                save_file(_unaliased(model_sd), str(tmp / "trainable.safetensors"))
                torch.save(opt_sd, tmp / "optimizer.pt")
                rng = {"cpu": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state_all()
                torch.save(rng, tmp / "rng.pt")
                meta = {"state": asdict(state), "scheduler": sched.state_dict(), "t2r_version": __version__}
                (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
            for old in sorted(root.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.info)

    @staticmethod
    def read_state(path: Path) -> TrainState:
        try:
            meta = json.loads((path / "state.json").read_text())
            return TrainState(**meta["state"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise T2RError(f"checkpoint {path} is unreadable ({first_line(e)})") from None

    def load(self, path: Path, wrapped: nn.Module, opt, sched) -> None:
        try:
            model_sd = load_file(str(path / "trainable.safetensors"))
            opt_sd = torch.load(path / "optimizer.pt", weights_only=True)
            rng = torch.load(path / "rng.pt", weights_only=True)
            meta = json.loads((path / "state.json").read_text())
        except Exception as e:  # truncated or foreign files: many exception types
            raise T2RError(f"checkpoint {path} is unreadable ({first_line(e)})") from None
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(unwrap(wrapped), model_sd, options=full)
        set_optimizer_state_dict(unwrap(wrapped), opt, opt_sd, options=_options())
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def drop(self, stage: int) -> None:
        """Remove a finished stage's checkpoints (and the checkpoints folder once it is empty)."""
        if self.info.is_main:
            shutil.rmtree(self.stage_root(stage), ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.run_dir / CKPT_DIR).rmdir()

    def sweep(self, finished: int) -> None:
        """Remove what a crash may have left: checkpoints of finished stages (and of no stage)."""
        root = self.run_dir / CKPT_DIR
        if not self.info.is_main or not root.is_dir():
            return
        for entry in root.iterdir():
            keep = entry.name.startswith("stage-") and entry.name[6:].isdigit() and int(entry.name[6:]) >= finished
            if not keep:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def stage_output_name(idx: int, stage: Stage) -> str:
    return f"{idx:02d}-{stage.name}"


def save_stage_output(model: nn.Module, run_dir: Path, idx: int, stage: Stage, info: DistInfo) -> StageRecord:
    """Write what stage IDX trained (atomically; on the main rank) and describe it. Collective under FSDP."""
    name = stage_output_name(idx, stage)
    sd = trainable_state_dict(model)
    if stage.train == "lora":
        record = StageRecord(name=stage.name, kind="adapter", output=f"{STAGES_DIR}/{name}", train=stage.train)
        if info.is_main:
            with atomic_path(run_dir / record.output, directory=True) as tmp:
                model.save_pretrained(str(tmp), state_dict=sd)
    else:
        record = StageRecord(
            name=stage.name, kind="delta", output=f"{STAGES_DIR}/{name}.safetensors", train=stage.train,
            changes_teacher=stage.train == "full",
        )  # fmt: skip
        if info.is_main:
            with atomic_path(run_dir / record.output) as tmp:
                save_file(_unaliased(sd), str(tmp), metadata={"format": "pt"})
    barrier(info)
    return record


def save_delta(run_dir: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """A prelude's delta (the calibrated norms) as stages/NAME.safetensors; returns its path in the run."""
    rel = f"{STAGES_DIR}/{name}.safetensors"
    with atomic_path(run_dir / rel) as tmp:
        save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    return rel


def stale_outputs(run_dir: Path, kept: list[StageRecord]) -> list[Path]:
    """Stage outputs on disk that the record does not list: written by a stage whose finish never committed."""
    root = run_dir / STAGES_DIR
    listed = {(run_dir / s.output).resolve() for s in kept}
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.resolve() not in listed and not p.name.startswith(".")]
