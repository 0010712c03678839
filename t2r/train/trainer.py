"""The finetuning loop: stages of attention transfer / LM / KD training with new, LoRA or full parameters.

Runs the same on one process or under torchrun (DDP or FSDP2). Every global batch is a fixed set of packed
rows; losses are token sums divided by the global token counts, so accumulation and data parallelism change
nothing but speed. Checkpoints (trainable weights, optimizer, scheduler, RNG, data cursor) are atomic and a
resumed run continues bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
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
from tqdm.auto import tqdm

from t2r import __version__
from t2r.errors import T2RError
from t2r.models.loading import check_converted_dir, load_converted
from t2r.teacher import load_teacher
from t2r.train.compiled import compile_decoder_layers
from t2r.train.data import PackedRows, load_documents, pack_documents, split_rows, tokenize_documents
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
from t2r.train.losses import ce_loss_sum, kd_loss_sum, transfer_loss_sum
from t2r.train.recall import add_recall_rows
from t2r.train.recipe import Recipe, Stage, load_recipe, recipe_from_dict, recipe_to_dict
from t2r.train.runs import RUN_FILE, apply_stage_outputs, read_run, teacher_weights_changed, write_run
from t2r.train.teacher_attention import as_teacher, attach_softmax_twins, calibrate_output_norms, gsa_modules
from t2r.train.trainable import check_module_lr, configure_trainable, lr_lambda, param_groups

LOG_FILE = "log.jsonl"
CKPT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------------------- data
class RowSampler:
    """Epoch-wise seeded permutations of the training rows; the cursor (epoch, position) is all its state."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self._epoch, self._perm = -1, None

    def take(self, count: int, state: TrainState) -> list[int]:
        rows = []
        while len(rows) < count:
            if self._epoch != state.epoch:
                gen = torch.Generator().manual_seed(self.seed * 7919 + state.epoch)
                self._perm, self._epoch = torch.randperm(self.n_rows, generator=gen).tolist(), state.epoch
            take = min(count - len(rows), self.n_rows - state.cursor)
            rows += self._perm[state.cursor : state.cursor + take]
            state.cursor += take
            if state.cursor == self.n_rows:
                state.epoch, state.cursor = state.epoch + 1, 0
        return rows


def build_rows(data: list[str], eval_data: list[str] | None, tokenizer, recipe: Recipe, info: DistInfo):
    """Packed train and held-out rows. Rank 0 tokenizes first so the others hit the datasets cache."""

    def make(specs):
        docs = load_documents(specs, recipe.data.text_field, recipe.data.encoding_errors)
        return pack_documents(tokenize_documents(docs, tokenizer, recipe.data.add_eos), recipe.seq_len)

    result = None
    for turn in (0, 1):
        if (turn == 0) == info.is_main:
            train = make(data)
            result = (train, make(eval_data)) if eval_data else split_rows(train, recipe.data.eval_fraction)
        barrier(info)
    return result


# ---------------------------------------------------------------------------------------------------- run state
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


def _autocast(recipe: Recipe, device: torch.device):
    if recipe.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Teacher:
    """Teacher logits for KD. While the teacher's weights are untouched (stages before any LoRA merge or full
    finetune), the student itself runs as the teacher: GSA layers swapped for their softmax twins and LoRA
    adapters disabled, so no second copy of the model is held. Otherwise a frozen teacher of its own (the
    converted checkpoint's tensors in the teacher's class), optionally on another device."""

    def __init__(self, model: nn.Module, shared: bool, model_dir: str, device: torch.device, dtype: torch.dtype):
        self.shared = shared
        self.model = model if shared else load_teacher(model_dir, dtype).to(device)
        self.device = next(self.model.parameters()).device

    @contextlib.contextmanager
    def _context(self, model):
        if not self.shared:
            yield
            return
        disable = getattr(unwrap(model), "disable_adapter", None)
        # Adapters first: peft looks for its layers, which the teacher's twins do not hold.
        with disable() if disable is not None else contextlib.nullcontext(), as_teacher(model):
            yield

    @torch.no_grad()
    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        runner = model if self.shared else self.model
        with self._context(runner):
            inputs = {k: batch[k].to(self.device) for k in ("input_ids", "position_ids")}
            return runner(**inputs, use_cache=False).logits

    @contextlib.contextmanager
    def as_teacher(self, model: nn.Module):
        """For evaluation of the teacher itself."""
        with self._context(model if self.shared else self.model):
            yield model if self.shared else self.model


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


# ------------------------------------------------------------------------------------------------ the trainer
class Trainer:
    def __init__(
        self,
        model_dir: str,
        out: Path,
        recipe: Recipe,
        train_rows: PackedRows,
        eval_rows: PackedRows,
        info: DistInfo,
        run: dict,
        state: TrainState,
        progress: bool,
    ):
        self.model_dir, self.out, self.recipe = model_dir, out, recipe
        self.train_rows, self.eval_rows, self.info = train_rows, eval_rows, info
        self.run, self.state, self.progress = run, state, progress
        self.sampler = RowSampler(len(train_rows), recipe.seed)
        self.log_path = out / LOG_FILE

    # ---- logging
    def log(self, **entry) -> None:
        if self.info.is_main:
            entry = {"time": round(time.time(), 3), **entry}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

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
        done = self.run["stages_done"]
        bf16_frozen = recipe.precision == "bf16" and stage.train != "full" and info.device.type == "cuda"
        base_dtype = torch.bfloat16 if bf16_frozen else torch.float32
        model = apply_stage_outputs(
            load_converted(self.model_dir, base_dtype), self.out, self.run.get("prelude", []) + done
        )
        attach_softmax_twins(model)  # before peft wraps the projections: the twins keep the base weights
        if idx == 0 and state.stage_step == 0 and "prelude" not in self.run:
            self._evaluate_and_calibrate(model.to(info.device))
        changed = teacher_weights_changed(done)
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
        opt = torch.optim.AdamW(param_groups(wrapped, stage), lr=stage.lr, betas=tuple(stage.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage))
        if state.stage_step > 0:
            self._load_checkpoint(wrapped, opt, sched)
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
                last = self._latest_checkpoint()
                raise T2RError(
                    f"non-finite loss at step {state.global_step + 1} (stage {stage.name}); stopped. "
                    f"Last good checkpoint: {last or 'none'}"
                )
            lr = sched.get_last_lr()[0]
            opt.step()
            opt.zero_grad(set_to_none=True)
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
                self._save_checkpoint(wrapped, opt, sched)
            if stopping:
                bar.close()
                return False
        bar.close()
        self._finish_stage(idx, wrapped)
        return True

    def _evaluate_and_calibrate(self, model: nn.Module) -> None:
        """Before the first stage: held-out perplexity of the teacher and of the converted model, then the
        output-norm calibration (recorded as the run's prelude, applied before every stage) and its eval."""
        recipe, info = self.recipe, self.info
        model.eval()
        teacher_ev = self.evaluate(model, teacher=Teacher(model, True, self.model_dir, info.device, torch.float32))
        self.run["teacher_eval"], self.run["converted_eval"] = teacher_ev, self.evaluate(model)
        if teacher_ev:
            self.log(type="eval", stage="teacher", step=0, tokens=0, **teacher_ev)
            self.log(type="eval", stage="converted", step=0, tokens=0, **self.run["converted_eval"])
        prelude = []
        n = min(recipe.calibrate_rows, len(self.train_rows))
        if n and gsa_modules(model):
            batches = [
                self._to_device(self.train_rows.batch(list(range(i, min(n, i + recipe.micro_batch_size)))))
                for i in range(0, n, recipe.micro_batch_size)
            ]
            with _autocast(recipe, info.device):
                weights = calibrate_output_norms(model, batches)
            out = self.out / "stages" / "calibrate.safetensors"
            if info.is_main:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(".tmp-calibrate.safetensors")
                save_file(
                    {k: v.float().cpu().contiguous() for k, v in weights.items()}, str(tmp), metadata={"format": "pt"}
                )
                tmp.rename(out)
            prelude.append(
                {
                    "name": "calibrate",
                    "kind": "delta",
                    "train": "calibrate",
                    "output": str(out.relative_to(self.out)),
                    "rows": n,
                    "tokens": n * recipe.seq_len,
                }
            )
            ev = self.evaluate(model)
            self.run["calibrated_eval"] = ev
            if ev:
                self.log(type="eval", stage="calibrated", step=0, tokens=0, **ev)
        self.run["prelude"] = prelude
        if info.is_main:
            write_run(self.out, self.run)
        barrier(info)
        model.train()

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
            batch = self._to_device(self.train_rows.batch(mrows))
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

    # ---- checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / CKPT_DIR

    def _latest_checkpoint(self) -> Path | None:
        found = sorted(self._ckpt_root().glob("step-*")) if self._ckpt_root().is_dir() else []
        return found[-1] if found else None

    def _options(self, full: bool = True) -> StateDictOptions:
        return StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=True)

    def _save_checkpoint(self, wrapped, opt, sched) -> None:
        model_sd = get_model_state_dict(unwrap(wrapped), options=self._options())
        opt_sd = get_optimizer_state_dict(unwrap(wrapped), opt, options=self._options())
        if self.info.is_main:
            root = self._ckpt_root()
            root.mkdir(parents=True, exist_ok=True)
            final = root / f"step-{self.state.global_step:07d}"
            tmp = root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(_unaliased(model_sd), str(tmp / "trainable.safetensors"))
            torch.save(opt_sd, tmp / "optimizer.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            meta = {"state": asdict(self.state), "scheduler": sched.state_dict(), "t2r_version": __version__}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
            tmp.rename(final)
            for old in sorted(root.glob("step-*"))[: -max(1, self.recipe.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.info)

    def _load_checkpoint(self, wrapped, opt, sched) -> None:
        path = self._latest_checkpoint()
        model_sd = load_file(str(path / "trainable.safetensors"))
        set_model_state_dict(unwrap(wrapped), model_sd, options=StateDictOptions(full_state_dict=True, strict=False))
        opt_sd = torch.load(path / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(unwrap(wrapped), opt, opt_sd, options=self._options())
        meta = json.loads((path / "state.json").read_text())
        sched.load_state_dict(meta["scheduler"])
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _finish_stage(self, idx: int, wrapped) -> None:
        stage, state, info = self.recipe.stages[idx], self.state, self.info
        model = unwrap(wrapped)
        outputs = self.out / "stages"
        name = f"{idx:02d}-{stage.name}"
        sd = get_model_state_dict(model, options=self._options())  # collective under FSDP
        outputs.mkdir(parents=True, exist_ok=True)
        if stage.train == "lora":
            entry = {"kind": "adapter", "output": f"stages/{name}"}
            if info.is_main:
                tmp = outputs / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(str(tmp), state_dict=sd)
                shutil.rmtree(outputs / name, ignore_errors=True)
                tmp.rename(outputs / name)
        else:
            entry = {"kind": "delta", "output": f"stages/{name}.safetensors", "changes_teacher": stage.train == "full"}
            if info.is_main:
                tmp = outputs / f".tmp-{name}.safetensors"
                save_file(_unaliased(sd), str(tmp), metadata={"format": "pt"})
                tmp.rename(outputs / f"{name}.safetensors")
        del sd
        entry.update(
            name=stage.name,
            train=stage.train,
            steps=stage.steps,
            tokens=state.stage_tokens,
            seconds=round(state.stage_seconds, 1),
            loss_weights=stage.loss,
            final_eval=state.best,
        )
        self.run["stages_done"].append(entry)
        self.run["tokens"] = state.tokens
        state.stage, state.stage_step, state.stage_tokens, state.stage_seconds, state.best = idx + 1, 0, 0, 0.0, {}
        self.run["cursor"] = {
            "epoch": state.epoch,
            "cursor": state.cursor,
            "global_step": state.global_step,
            "tokens": state.tokens,
        }
        if info.is_main:
            write_run(self.out, self.run)
            shutil.rmtree(self._ckpt_root(), ignore_errors=True)
            self.log(
                type="stage_end",
                stage=stage.name,
                step=state.global_step,
                tokens=state.tokens,
                stage_tokens=entry["tokens"],
                seconds=entry["seconds"],
            )
        barrier(info)


# ------------------------------------------------------------------------------------------------- entry point
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
    """Finetune a converted model. Returns the run directory (see t2r.train.runs for its layout)."""
    info = init_distributed(device)
    out = Path(out)
    recipe = load_recipe(recipe_path, overrides)
    model_dir = str(Path(model_dir).resolve())
    run = _open_run(out, model_dir, recipe, data, eval_data, resume, info)
    recipe = recipe_from_dict(run["recipe"])  # a resumed run keeps its own recipe
    torch.manual_seed(recipe.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows, eval_rows = build_rows(run["data"], run.get("eval_data"), tokenizer, recipe, info)
    train_rows, recall_rows = add_recall_rows(
        train_rows, tokenizer, recipe.data.recall_fraction, recipe.seed, recipe.data.recall_answer_weight
    )
    if len(train_rows) < recipe.rows_per_step * info.world:
        raise T2RError(
            f"the corpus has {len(train_rows)} training rows of {recipe.seq_len} tokens, fewer than one "
            f"global batch ({recipe.rows_per_step * info.world} rows); lower seq_len or batch size"
        )
    state = _resume_state(out, run) if resume else TrainState()
    if info.is_main and not resume:
        run["data_stats"] = {
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "seq_len": recipe.seq_len,
            "train_tokens": len(train_rows) * recipe.seq_len,
            "recall_rows": recall_rows,
        }
        write_run(out, run)
    trainer = Trainer(model_dir, out, recipe, train_rows, eval_rows, info, run, state, progress)
    for idx in range(state.stage, len(recipe.stages)):
        if not trainer.run_stage(idx, stop_after):
            return out
    run["status"] = "done"
    if info.is_main:
        write_run(out, run)
        from t2r.train.plotting import plot_run

        plot_run(out)
    return out


def _open_run(out: Path, model_dir: str, recipe: Recipe, data, eval_data, resume: bool, info: DistInfo) -> dict:
    exists = (out / RUN_FILE).is_file()
    if resume:
        if not exists:
            raise T2RError(f"nothing to resume in {out} (no {RUN_FILE})")
        run = read_run(out)
        if run.get("status") == "done":
            raise T2RError(f"the run in {out} is already finished")
        return run
    if out.exists() and any(out.iterdir()):
        raise T2RError(f"run directory {out} already exists and is not empty (use --resume to continue it)")
    check_converted_dir(model_dir)
    check_module_lr(model_dir, recipe)
    run = {
        "t2r_version": __version__,
        "model_dir": model_dir,
        "data": list(data),
        "eval_data": list(eval_data) if eval_data else None,
        "recipe": recipe_to_dict(recipe),
        "stages_done": [],
        "status": "running",
        "world_size": info.world,
    }
    barrier(info)  # every rank has checked OUT before rank 0 creates it
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_run(out, run)
    barrier(info)
    return broadcast_object(run, info)


def _resume_state(out: Path, run: dict) -> TrainState:
    ckpts = sorted((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).is_dir() else []
    if ckpts:
        state = TrainState(**json.loads((ckpts[-1] / "state.json").read_text())["state"])
    else:  # restart the current stage from its beginning
        cur = run.get("cursor", {})
        state = TrainState(
            stage=len(run["stages_done"]),
            epoch=cur.get("epoch", 0),
            cursor=cur.get("cursor", 0),
            global_step=cur.get("global_step", 0),
            tokens=cur.get("tokens", 0),
        )
    log = out / LOG_FILE
    if log.is_file():  # drop log lines from steps that will be redone
        kept = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= state.global_step]
        log.write_text("".join(line + "\n" for line in kept))
    return state
