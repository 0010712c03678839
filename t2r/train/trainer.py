"""The finetuning loop: stages of attention transfer / LM / KD training with new, LoRA or full parameters.

Runs the same on one process or under torchrun (DDP or FSDP2). Every global batch is a fixed set of packed
rows; losses are token sums divided by the global token counts, so accumulation and data parallelism change
nothing but speed.

A run directory moves through these states, each transition one atomic rename (t2r.fsutil):
1. absent -> created whole (run.json + an empty log) once the recipe, the model and the data have been checked;
2. calibrated: the teacher's and the converted model's held-out loss and the output-norm calibration are recorded
   (``prelude``);
3. stage k in progress: checkpoints under checkpoints/stage-k/step-N, each complete or absent;
4. stage k finished: its output is written (stages/NN-name), then run.json lists it (the commit), then the stage's
   checkpoints are removed;
5. done: run.json says so.
A crash anywhere leaves a state ``--resume`` continues from exactly (a resumed run reproduces the uninterrupted
one's losses bit for bit on CPU): an output the record does not list, and checkpoints of a finished stage, are
leftovers of an interrupted transition and are removed.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from t2r import __version__
from t2r.devices import same_device
from t2r.errors import T2RError
from t2r.fsutil import atomic_path, sweep_stale_temps
from t2r.models.loading import check_converted_dir, load_converted
from t2r.train.checkpointer import Checkpointer, TrainState, save_delta, save_stage_output, stale_outputs
from t2r.train.compiled import compile_decoder_layers
from t2r.train.data import PackedRows, RowSampler, build_rows
from t2r.train.distill import Teacher
from t2r.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gradient_sync,
    init_distributed,
    unwrap,
    wrap_model,
)
from t2r.train.graphed_step import CaptureFailed, GraphedStudentStep
from t2r.train.losses import ce_loss_sum, kd_loss_sum, transfer_loss_sum
from t2r.train.recall import add_recall_rows
from t2r.train.recipe import Recipe, Stage, load_recipe, recipe_from_dict, recipe_to_dict
from t2r.train.reporting import Reporter, check_reporters, truncate_log
from t2r.train.run_record import LOG_FILE, RUN_FILE, STAGES_DIR, RunRecord, StageRecord, apply_stage_outputs, read_run
from t2r.train.run_record import teacher_weights_changed as changed_teacher
from t2r.train.teacher_attention import attach_softmax_twins, calibrate_output_norms, gsa_modules
from t2r.train.trainable import check_module_lr, configure_trainable, param_groups

# Graphed steps off a GPU: the tests' emulation (t2r.train.graphed_step), never a user's run.
EMULATE_GRAPHS = False


def graphs_refusal(recipe: Recipe, stage: Stage, info: DistInfo) -> str | None:
    """Why a stage's micro-batches cannot run as CUDA graphs (t2r.train.graphed_step), or None."""
    if info.device.type != "cuda" and not EMULATE_GRAPHS:
        return "CUDA graphs need a GPU"
    if info.enabled:
        return "one process only (not under torchrun)"
    if recipe.compile:
        return "not with compile"
    if recipe.gradient_checkpointing:  # its recomputation saves and restores the RNG state: not under capture
        return "not with gradient checkpointing"
    if stage.loss.get("transfer", 0) > 0:
        return "not with attention transfer (its hooks run eagerly)"
    teacher_elsewhere = recipe.teacher_device and not same_device(torch.device(recipe.teacher_device), info.device)
    if stage.loss.get("kd", 0) > 0 and teacher_elsewhere:
        return "not with the KD teacher on another device (teacher_device)"
    return None


def _autocast(recipe: Recipe, device: torch.device):
    if recipe.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _scheduler(opt: torch.optim.Optimizer, stage: Stage):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the stage's lr (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=stage.warmup_steps, num_training_steps=stage.steps, min_lr_rate=stage.min_lr_ratio
    )


class Trainer:
    def __init__(
        self,
        out: Path,
        recipe: Recipe,
        train_rows: PackedRows,
        eval_rows: PackedRows,
        info: DistInfo,
        run: RunRecord,
        state: TrainState,
        progress: bool,
    ):
        self.model_dir, self.out, self.recipe = run.model_dir, out, recipe
        self.train_rows, self.eval_rows, self.info = train_rows, eval_rows, info
        self.run, self.state, self.progress = run, state, progress
        self.sampler = RowSampler(len(train_rows), recipe.seed)
        self.checkpoints = Checkpointer(out, info, recipe.keep_checkpoints)
        self.reporter = Reporter(out, recipe.report_to, info.is_main, config=run.recipe)
        self.graphed: GraphedStudentStep | None = None  # the stage's graphed micro-batch step (recipe ``graphs``)

    def log(self, **entry) -> None:
        self.reporter.log(**entry)

    def commit(self) -> None:
        """Write the run record (rank 0): the step that makes a transition count."""
        if self.info.is_main:
            self.run.write(self.out)
        barrier(self.info)

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, teacher: Teacher | None = None) -> dict:
        rows = self.eval_rows
        n = min(self.recipe.eval_rows, len(rows)) // self.info.world * self.info.world  # equal work per rank
        if n == 0:
            return {}
        mine = list(range(self.info.rank, n, self.info.world))
        loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        count = torch.zeros((), dtype=torch.float64, device=self.info.device)
        was_training = model.training
        model.eval()
        ctx = teacher.as_teacher(model) if teacher is not None else contextlib.nullcontext(model)
        with ctx as runner:
            for i in range(0, len(mine), self.recipe.micro_batch_size):
                batch = self._to_device(rows.batch(mine[i : i + self.recipe.micro_batch_size]))
                with _autocast(self.recipe, self.info.device):
                    logits = runner(
                        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
                    ).logits
                loss += ce_loss_sum(logits, batch["labels"]).double().to(loss.device)
                count += (batch["labels"][:, 1:] != -100).sum().double().to(count.device)
        model.train(was_training)
        loss, count = all_reduce_sum(loss, self.info), all_reduce_sum(count, self.info)
        mean = (loss / count).item()
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(count.item())}

    def _to_device(self, batch: dict) -> dict:
        device = self.info.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    # ---- one stage
    def run_stage(self, idx: int, stop_after: int | None) -> bool:
        """Train stage ``idx``; returns False when stopped early by ``stop_after``."""
        recipe, stage, info, state = self.recipe, self.recipe.stages[idx], self.info, self.state
        done = self.run.stages_done
        bf16_frozen = recipe.precision == "bf16" and stage.train != "full" and info.device.type == "cuda"
        base_dtype = torch.bfloat16 if bf16_frozen else torch.float32
        model = apply_stage_outputs(load_converted(self.model_dir, base_dtype), self.out, self.run.applied)
        attach_softmax_twins(model)  # before peft wraps the projections: the twins keep the base weights
        if self.run.prelude is None:
            self._prelude(model.to(info.device))
        changed = changed_teacher(done)
        if stage.loss.get("transfer", 0) > 0 and changed:
            raise T2RError(
                f"stage {stage.name}: attention transfer needs the teacher's attention weights, but an "
                "earlier stage changed them; put transfer stages first"
            )
        model, _ = configure_trainable(model, stage, recipe.seed + idx)
        model.to(info.device)
        if recipe.gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.compile and not stage.loss.get("transfer", 0):  # transfer stages stay eager (t2r.train.compiled)
            compile_decoder_layers(model)
        teacher = None
        if stage.loss.get("kd", 0) > 0:
            shared = not changed and stage.train != "full"
            tdev = torch.device(recipe.teacher_device) if recipe.teacher_device else info.device
            teacher = Teacher(model, shared, self.model_dir, tdev, base_dtype)
        model.train()
        wrapped = wrap_model(model, info, recipe.distributed, side_losses=stage.loss.get("transfer", 0) > 0)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        self.graphed = self._graphed_step(wrapped, stage, idx, teacher)
        opt = torch.optim.AdamW(param_groups(wrapped, stage), lr=stage.lr, betas=tuple(stage.betas))
        sched = _scheduler(opt, stage)
        latest = self.checkpoints.latest(idx)
        if state.stage_step > 0 and latest is not None:
            self.checkpoints.load(latest, wrapped, opt, sched)
        elif info.is_main:
            self.log(
                type="stage_start",
                stage=stage.name,
                stage_index=idx,
                train=stage.train,
                trainable_params=sum(p.numel() for p in params),
                loss_weights=stage.loss,
                kd_teacher=None if teacher is None else ("shared" if teacher.shared else "separate"),
            )

        rows_per_step = recipe.rows_per_step * info.world
        bar = tqdm(
            total=stage.steps,
            initial=state.stage_step,
            desc=f"{stage.name}",
            unit="step",
            disable=not (self.progress and info.is_main),
        )
        started = time.time() - state.stage_seconds
        tick, tick_tokens = time.time(), 0
        while state.stage_step < stage.steps:
            rows = self.sampler.take(rows_per_step, state)
            sums = self._train_step(wrapped, rows, stage, teacher)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            if not all(math.isfinite(v) for v in sums.values()) or not math.isfinite(float(grad_norm)):
                last = self.checkpoints.latest(idx)
                raise T2RError(
                    f"non-finite loss at step {state.global_step + 1} (stage {stage.name}); stopped. "
                    f"Last good checkpoint: {last or 'none'}"
                )
            lr = sched.get_last_lr()[0]
            opt.step()
            opt.zero_grad(set_to_none=self.graphed is None)  # a graphed step adds to the gradients it captured
            sched.step()
            step_tokens = rows_per_step * recipe.seq_len
            state.stage_step += 1
            state.global_step += 1
            state.tokens += step_tokens
            state.stage_tokens += step_tokens
            state.stage_seconds = time.time() - started
            tick_tokens += step_tokens
            if state.global_step % recipe.log_every == 0 or state.stage_step == stage.steps:
                tps = tick_tokens / max(time.time() - tick, 1e-9)
                self.log(
                    type="train",
                    stage=stage.name,
                    step=state.global_step,
                    stage_step=state.stage_step,
                    loss=sums["loss"],
                    **{k: v for k, v in sums.items() if k != "loss"},
                    lr=lr,
                    grad_norm=float(grad_norm),
                    tokens=state.tokens,
                    tokens_per_s=round(tps, 1),
                )
                bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tps:,.0f}")
                tick, tick_tokens = time.time(), 0
            bar.update(1)
            is_last = state.stage_step == stage.steps
            if recipe.eval_every and (state.global_step % recipe.eval_every == 0 or is_last):
                ev = self.evaluate(wrapped)
                if ev:
                    self.log(type="eval", stage=stage.name, step=state.global_step, tokens=state.tokens, **ev)
                    state.best = ev
            stopping = stop_after is not None and state.global_step >= stop_after and not is_last
            if not is_last and (
                stopping or (recipe.checkpoint_every and state.global_step % recipe.checkpoint_every == 0)
            ):
                self.checkpoints.save(wrapped, opt, sched, state)
            if stopping:
                bar.close()
                return False
        bar.close()
        self._finish_stage(idx, wrapped)
        return True

    def _prelude(self, model: nn.Module) -> None:
        """Before the first stage: held-out perplexity of the teacher and of the converted model, then the
        output-norm calibration (recorded as the run's prelude, applied before every stage) and its eval."""
        recipe, info = self.recipe, self.info
        model.eval()
        teacher_ev = self.evaluate(model, teacher=Teacher(model, True, self.model_dir, info.device, torch.float32))
        self.run.teacher_eval, self.run.converted_eval = teacher_ev, self.evaluate(model)
        if teacher_ev:
            self.log(type="eval", stage="teacher", step=0, tokens=0, **teacher_ev)
            self.log(type="eval", stage="converted", step=0, tokens=0, **self.run.converted_eval)
        prelude = []
        n = min(recipe.calibrate_rows, len(self.train_rows))
        if n and gsa_modules(model):
            batches = [
                self._to_device(self.train_rows.batch(list(range(i, min(n, i + recipe.micro_batch_size)))))
                for i in range(0, n, recipe.micro_batch_size)
            ]
            with _autocast(recipe, info.device):
                weights = calibrate_output_norms(model, batches)
            output = f"{STAGES_DIR}/calibrate.safetensors"
            if info.is_main:
                output = save_delta(self.out, "calibrate", weights)
            record = StageRecord(name="calibrate", kind="delta", output=output, train="calibrate", rows=n)
            record.tokens = n * recipe.seq_len
            prelude.append(record)
            self.run.calibrated_eval = self.evaluate(model)
            if self.run.calibrated_eval:
                self.log(type="eval", stage="calibrated", step=0, tokens=0, **self.run.calibrated_eval)
        self.run.prelude = prelude
        self.commit()
        model.train()

    def _graphed_step(self, wrapped, stage: Stage, idx: int, teacher: Teacher | None) -> GraphedStudentStep | None:
        """The stage's graphed micro-batch step where the recipe asks for one and the stage allows it (logged)."""
        recipe, info = self.recipe, self.info
        if not recipe.graphs:
            return None
        why = graphs_refusal(recipe, stage, info)
        if info.is_main:
            self.log(type="graphs", stage=stage.name, stage_index=idx, on=why is None, **({"why": why} if why else {}))
        if why is not None:
            return None
        weights = {k: v for k, v in stage.loss.items() if k in ("ce", "kd") and v > 0}
        return GraphedStudentStep(
            wrapped,
            weights,
            recipe.precision,
            info.device,
            teacher=teacher if "kd" in weights else None,
            temperature=stage.kd_temperature,
            emulate=info.device.type != "cuda",
        )

    def _train_step(self, wrapped, rows: list[int], stage: Stage, teacher: Teacher | None) -> dict:
        """Forward/backward over this rank's micro-batches of the global batch; returns global loss means."""
        recipe, info = self.recipe, self.info
        micro, world = recipe.micro_batch_size, info.world
        labels_global = self.train_rows.label_count(rows)
        tokens_global = len(rows) * recipe.seq_len
        w = {k: stage.loss.get(k, 0.0) for k in ("transfer", "ce", "kd")}
        passes = (["transfer"] if w["transfer"] > 0 else []) + (["student"] if w["ce"] + w["kd"] > 0 else [])
        sums = {k: torch.zeros((), dtype=torch.float64, device=info.device) for k in w if w[k] > 0}
        my_micro = [
            rows[(a * world + info.rank) * micro : (a * world + info.rank + 1) * micro]
            for a in range(recipe.grad_accum)
        ]
        for a, mrows in enumerate(my_micro):
            host = self.train_rows.batch(mrows)
            share = None if self.graphed is None else self._graphed_share(host, labels_global, stage)
            if share is not None:
                for name, value in share.items():
                    sums[name] += value
                continue
            batch = self._to_device(host)
            for j, kind in enumerate(passes):
                sync = a == len(my_micro) - 1 and j == len(passes) - 1
                with gradient_sync(wrapped, sync), _autocast(recipe, info.device):
                    if kind == "transfer":
                        fsdp = info.enabled and recipe.distributed == "fsdp"
                        sq, layers = transfer_loss_sum(wrapped, batch, through_output=fsdp)
                        loss = w["transfer"] * sq / (layers * tokens_global) * world
                        sums["transfer"] += sq.detach().double() / (layers * tokens_global)
                    else:
                        logits = wrapped(
                            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
                        ).logits
                        loss = 0.0
                        if w["ce"] > 0:
                            ce = ce_loss_sum(logits, batch["labels"], batch.get("label_weights"))
                            loss = loss + w["ce"] * ce / labels_global * world
                            sums["ce"] += ce.detach().double() / labels_global
                        if w["kd"] > 0:
                            t_logits = teacher.logits(wrapped, batch)
                            kd = kd_loss_sum(
                                logits, t_logits, batch["labels"], stage.kd_temperature, batch.get("label_weights")
                            )
                            loss = loss + w["kd"] * kd / labels_global * world
                            sums["kd"] += kd.detach().double() / labels_global
                loss.backward()
        out = {k: all_reduce_sum(v, info).item() for k, v in sums.items()}
        out["loss"] = sum(w[k] * v for k, v in out.items())
        return out

    def _graphed_share(self, batch: dict, labels_global: int, stage: Stage) -> dict[str, torch.Tensor] | None:
        """The graphed step's share of the loss, or None where its graph cannot be captured: graphs are then off for
        the rest of the stage (logged), and the micro-batch runs eagerly."""
        try:
            return self.graphed(batch, labels_global)
        except CaptureFailed as err:
            self.graphed = None
            if self.info.is_main:
                self.log(type="graphs", stage=stage.name, on=False, why=f"capture failed: {err}")
            return None

    def _finish_stage(self, idx: int, wrapped) -> None:
        """State 3 -> 4: the output, then the record (the commit), then the stage's checkpoints go."""
        stage, state = self.recipe.stages[idx], self.state
        record = save_stage_output(unwrap(wrapped), self.out, idx, stage, self.info)
        record.steps, record.tokens, record.seconds = stage.steps, state.stage_tokens, round(state.stage_seconds, 1)
        record.loss_weights, record.final_eval = dict(stage.loss), state.best
        self.run.stages_done.append(record)
        self.run.tokens = state.tokens
        state.stage, state.stage_step, state.stage_tokens, state.stage_seconds, state.best = idx + 1, 0, 0, 0.0, {}
        self.run.cursor = {"epoch": state.epoch, "cursor": state.cursor, "global_step": state.global_step,
                           "tokens": state.tokens}  # fmt: skip
        self.commit()
        self.checkpoints.drop(idx)
        self.log(type="stage_end", stage=stage.name, step=state.global_step, tokens=state.tokens,
                 stage_tokens=record.tokens, seconds=record.seconds)  # fmt: skip
        barrier(self.info)


# ------------------------------------------------------------------------------------------------- entry points
def finetune(
    model_dir: str,
    out: str | Path,
    data: list[str],
    recipe_path: str | None = None,
    overrides: list[str] | None = None,
    eval_data: list[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Finetune a converted model into run directory OUT (see the module docstring for its states). With
    ``resume``, continue OUT: the arguments must be the ones the run was started with (``resume_run`` takes
    them from the run instead)."""
    info = init_distributed(device)
    out = Path(out)
    recipe = load_recipe(recipe_path, overrides)
    model_dir = str(Path(model_dir).resolve())
    if resume:
        if not (out / RUN_FILE).is_file():
            raise T2RError(f"nothing to resume in {out} (no {RUN_FILE})")
        run = read_run(out)
        _check_same_arguments(out, run, model_dir, data, eval_data, recipe)
        return _continue(out, run, info, stop_after, progress)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise T2RError(f"run directory {out} already exists and is not empty (use --resume to continue it)")
    check_converted_dir(model_dir)
    check_module_lr(model_dir, recipe)
    check_reporters(recipe.report_to)
    run = RunRecord(t2r_version=__version__, model_dir=model_dir, data=list(data), recipe=recipe_to_dict(recipe),
                    eval_data=list(eval_data) if eval_data else None, recipe_source=recipe_path,
                    overrides=list(overrides or []), world_size=info.world)  # fmt: skip
    train_rows, eval_rows, stats = _rows(run, recipe, info)  # every data check passes before OUT exists
    run.data_stats = stats
    barrier(info)  # every rank has checked OUT before rank 0 creates it
    if info.is_main:
        with atomic_path(out, directory=True) as tmp:
            (tmp / RUN_FILE).write_text(run.to_json())
            (tmp / LOG_FILE).touch()
    barrier(info)
    return _train(out, run, recipe, train_rows, eval_rows, info, TrainState(), stop_after, progress)


def resume_run(out: str | Path, stop_after: int | None = None, device: str | None = None,
               progress: bool = True) -> Path:  # fmt: skip
    """Continue the run in OUT exactly as it was started (its recorded model, data and recipe)."""
    info = init_distributed(device)
    out = Path(out)
    return _continue(out, read_run(out), info, stop_after, progress)


def _check_same_arguments(out: Path, run: RunRecord, model_dir: str, data, eval_data, recipe: Recipe) -> None:
    """--resume with the arguments the run was started with; any other is refused, naming what differs."""
    typed = {"MODEL_DIR": model_dir, "--data": list(data), "--eval-data": list(eval_data) if eval_data else None,
             "--recipe/--set": recipe_to_dict(recipe)}  # fmt: skip
    recorded = {"MODEL_DIR": run.model_dir, "--data": run.data, "--eval-data": run.eval_data,
                "--recipe/--set": run.recipe}  # fmt: skip
    differ = [name for name in typed if typed[name] != recorded[name]]
    if differ:
        started = f"MODEL_DIR {run.model_dir}, --data {' '.join(run.data)}, --recipe {run.recipe_source or '(none)'}"
        started += "".join(f" --set {o}" for o in run.overrides)
        raise T2RError(
            f"--resume: {', '.join(differ)} differ from the run's ({started}); give the same arguments, or "
            f"continue it as recorded with: t2r resume {out}"
        )


def _continue(out: Path, run: RunRecord, info: DistInfo, stop_after: int | None, progress: bool) -> Path:
    if run.status == "done":
        raise T2RError(f"the run in {out} is already finished")
    recipe = recipe_from_dict(run.recipe)
    if info.is_main:  # leftovers of an interrupted transition (module docstring)
        sweep_stale_temps(out)
        sweep_stale_temps(out / STAGES_DIR)
        for stale in stale_outputs(out, run.applied):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        Checkpointer(out, info, recipe.keep_checkpoints).sweep(len(run.stages_done))
    barrier(info)
    state = _resume_state(out, run, recipe, info)
    train_rows, eval_rows, _ = _rows(run, recipe, info)
    if info.is_main:
        truncate_log(out, state.global_step)
    return _train(out, run, recipe, train_rows, eval_rows, info, state, stop_after, progress)


def _rows(run: RunRecord, recipe: Recipe, info: DistInfo) -> tuple[PackedRows, PackedRows, dict]:
    from t2r.models.loading import load_tokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(run.model_dir)
    train_rows, eval_rows = build_rows(run.data, run.eval_data, tokenizer, recipe, info)
    train_rows, recall_rows = add_recall_rows(
        train_rows, tokenizer, recipe.data.recall_fraction, recipe.seed, recipe.data.recall_answer_weight
    )
    if len(train_rows) < recipe.rows_per_step * info.world:
        raise T2RError(
            f"the corpus has {len(train_rows)} training rows of {recipe.seq_len} tokens, fewer than one "
            f"global batch ({recipe.rows_per_step * info.world} rows); lower seq_len or batch size"
        )
    stats = {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "seq_len": recipe.seq_len,
             "train_tokens": len(train_rows) * recipe.seq_len, "recall_rows": recall_rows}  # fmt: skip
    return train_rows, eval_rows, stats


def _resume_state(out: Path, run: RunRecord, recipe: Recipe, info: DistInfo) -> TrainState:
    stage = len(run.stages_done)
    latest = Checkpointer(out, info, recipe.keep_checkpoints).latest(stage)
    if latest is not None:
        state = Checkpointer.read_state(latest)
        if state.stage != stage:
            raise T2RError(f"checkpoint {latest} belongs to stage {state.stage}, not {stage}")
        return state
    cur = run.cursor  # restart the current stage from its beginning
    return TrainState(stage=stage, epoch=cur.get("epoch", 0), cursor=cur.get("cursor", 0),
                      global_step=cur.get("global_step", 0), tokens=cur.get("tokens", 0))  # fmt: skip


def _train(out: Path, run: RunRecord, recipe: Recipe, train_rows, eval_rows, info: DistInfo, state: TrainState,
           stop_after: int | None, progress: bool) -> Path:  # fmt: skip
    run = broadcast_object(run, info)
    trainer = Trainer(out, recipe, train_rows, eval_rows, info, run, state, progress)
    try:
        for idx in range(state.stage, len(recipe.stages)):
            if not trainer.run_stage(idx, stop_after):
                return out
        run.status = "done"
        trainer.commit()
        if info.is_main:
            from t2r.train.plotting import plot_run

            plot_run(out)
    finally:
        trainer.reporter.close()
    return out
