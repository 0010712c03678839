"""t2r finetune on tiny models: objectives, trainable sets, exact resume, data parallel agreement, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, run_cli
from safetensors import safe_open

from t2r.errors import T2RError
from t2r.models.loading import load_converted
from t2r.train.data import load_documents, pack_documents, tokenize_documents
from t2r.train.losses import transfer_loss_sum
from t2r.train.recipe import Stage, load_recipe
from t2r.train.run_record import read_run, rebuild_model
from t2r.train.teacher_attention import TransferCollector
from t2r.train.trainable import configure_trainable
from t2r.train.trainer import finetune

RECIPE = str(Path(__file__).resolve().parent.parent / "t2r" / "train" / "recipes" / "tiny-test.yaml")


def train_losses(run: Path) -> dict[int, float]:
    from t2r.train.reporting import read_log

    return {e["step"]: e["loss"] for e in read_log(run) if e["type"] == "train"}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_two_stage_run(tiny_converted, corpus_files, tmp_path):
    run_dir = finetune(str(tiny_converted), tmp_path / "run", corpus_files, RECIPE, progress=False)
    run = read_run(run_dir)
    assert run.status == "done"
    assert [s.kind for s in run.stages_done] == ["delta", "adapter"]
    assert run.tokens == 12 * 4 * 64 and [s.tokens for s in run.stages_done] == [6 * 256, 6 * 256]
    assert run.teacher_eval["eval_ppl"] > 1 and run.converted_eval["eval_ppl"] > 1
    assert (run_dir / "loss.png").stat().st_size > 10_000
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert {e["type"] for e in log} == {"stage_start", "train", "eval", "stage_end"}
    lm = [e for e in log if e["type"] == "train" and e["stage"] == "lm"]
    assert all({"ce", "kd", "tokens_per_s", "lr", "grad_norm"} <= set(e) for e in lm)
    assert not (run_dir / "checkpoints").exists()  # superseded by the stage outputs


def test_lm_loss_falls_on_a_fixed_batch(tiny_converted, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 8))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_converted)
    rows = len(pack_documents(tokenize_documents(load_documents([str(text)]), tok), 32))
    run = finetune(
        str(tiny_converted),
        tmp_path / "run",
        [str(text)],
        None,
        [
            "seq_len=32",
            f"micro_batch_size={rows}",
            "precision=fp32",
            "eval_every=0",
            "checkpoint_every=0",
            "data.eval_fraction=0",
            "stages.0.train=full",
            "stages.0.steps=20",
            "stages.0.lr=0.01",
            "stages.0.warmup_steps=0",
        ],
        progress=False,
    )
    losses = train_losses(run)
    assert losses[20] < 0.6 * losses[1]


def test_module_lr_trains_the_named_modules_at_their_own_rate(tmp_path, corpus_files, tiny_converted):
    """Adam's first step moves every parameter with a gradient by about its lr: the window mix by module_lr,
    everything else by the stage's lr (fails if module_lr were ignored or applied to all)."""
    from t2r.convert import ConvertOptions, convert

    teacher = json.loads((tiny_converted / "conversion.json").read_text())["source"]["path"]
    hybrid = convert(teacher, tmp_path / "hybrid", ConvertOptions(num_slots=16, window=8), progress=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "seq_len: 64\nmicro_batch_size: 2\nprecision: fp32\ncalibrate_rows: 0\ncheckpoint_every: 0\n"
        "stages:\n  - {name: lm, train: full, steps: 1, lr: 1.0e-6, warmup_steps: 0, loss: {ce: 1.0},"
        " module_lr: {window_mix: 5e-2}}\n"
    )
    run = finetune(str(hybrid), tmp_path / "run", corpus_files, str(recipe), progress=False)
    base, final = load_converted(hybrid).state_dict(), rebuild_model(run).state_dict()
    moved = {k: (final[k] - base[k]).abs().max().item() for k in base}
    mix = [v for k, v in moved.items() if ".window_mix." in k]
    rest = [v for k, v in moved.items() if ".window_mix." not in k]
    assert len(mix) == 3 and all(4e-2 < v < 6e-2 for v in mix), mix
    assert 0 < max(rest) < 2e-6, max(rest)


def test_module_lr_on_a_module_the_stage_does_not_train(tiny_converted):
    from t2r.errors import T2RError
    from t2r.train.trainable import param_groups

    model, _ = configure_trainable(load_converted(tiny_converted), Stage(train="new"), 0)
    with pytest.raises(T2RError, match="module_lr names 'q_proj', which holds no parameter this stage trains"):
        param_groups(model, Stage(name="transfer", train="new", module_lr={"q_proj": 1e-3}))


def test_module_lr_may_name_lora_adapters_in_lora_stages_only(tiny_converted):
    """peft's adapter modules exist only once a LoRA stage wraps the model: the early check accepts their names
    there (it rejected them before), the groups then give them their rate, and other stages still reject them."""
    from t2r.errors import T2RError
    from t2r.train.recipe import Recipe
    from t2r.train.trainable import check_module_lr, param_groups

    lora = Stage(name="transfer", train="lora", lr=1e-3, module_lr={"lora_B": 5e-2})
    check_module_lr(str(tiny_converted), Recipe(stages=[lora]))
    model, _ = configure_trainable(load_converted(tiny_converted), lora, 0)
    rates = {id(p): g["lr"] for g in param_groups(model, lora) for p in g["params"]}
    by_kind = {
        kind: {rates[id(p)] for n, p in model.named_parameters() if p.requires_grad and f".{kind}." in n}
        for kind in ("lora_A", "lora_B")
    }
    assert by_kind == {"lora_A": {1e-3}, "lora_B": {5e-2}}, by_kind
    full = Stage(name="lm", train="full", module_lr={"lora_B": 1e-2})
    with pytest.raises(T2RError, match=r"stages.0 \(lm\): module_lr names 'lora_B', which this model does not have"):
        check_module_lr(str(tiny_converted), Recipe(stages=[full]))


def test_lora_stage_and_rebuild_raise_no_upstream_deprecation_warning(tiny_converted, tiny_run):
    """peft's read of transformers' deprecated alias is silenced where t2r wraps models (the user cannot act on it),
    while other warnings still pass."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_trainable(load_converted(tiny_converted), Stage(train="lora"), 0)
        rebuild_model(tiny_run)
        warnings.warn("still shown", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert "still shown" in messages
    assert not [m for m in messages if "is_gradient_checkpointing" in m], messages


def test_module_lr_innermost_name_wins():
    from t2r.train.trainable import param_groups

    model = torch.nn.Module()
    model.window_mix = torch.nn.Module()
    model.window_mix.weight = torch.nn.Parameter(torch.zeros(3))
    model.window_mix.proj = torch.nn.Linear(4, 3, bias=False)
    model.other = torch.nn.Linear(4, 4)
    for order in ({"window_mix": 1e-2, "proj": 1e-4}, {"proj": 1e-4, "window_mix": 1e-2}):
        groups = param_groups(model, Stage(lr=1e-3, weight_decay=0.1, module_lr=order))
        by_lr = {(g["lr"], g["weight_decay"]): {p.shape for p in g["params"]} for g in groups}
        assert groups[0]["lr"] == 1e-3
        assert by_lr == {(1e-3, 0.1): {(4, 4)}, (1e-3, 0.0): {(4,)}, (1e-2, 0.0): {(3,)}, (1e-4, 0.1): {(3, 4)}}


@torch.no_grad()
def per_layer_mse(model, batch) -> dict[int, float]:
    collector = TransferCollector()
    transfer_loss_sum(model, batch, collector)
    return {k: float(v) for k, v in collector.per_layer.items()}


def test_transfer_stage_lowers_every_layers_mse(tiny_converted, corpus_files, tmp_path):
    run = finetune(
        str(tiny_converted),
        tmp_path / "run",
        corpus_files,
        RECIPE,
        ["stages=[{name: transfer, train: new, steps: 60, lr: 0.02, warmup_steps: 0, loss: {transfer: 1}}]"],
        progress=False,
    )
    from transformers import AutoTokenizer

    rows = pack_documents(
        tokenize_documents(load_documents(corpus_files), AutoTokenizer.from_pretrained(tiny_converted)), 64
    )
    batch = rows.batch(list(range(8)))
    before = per_layer_mse(rebuild_model(run, upto=0).eval(), batch)  # calibrated, not yet trained
    after = per_layer_mse(rebuild_model(run).eval(), batch)
    assert set(before) == {0, 1, 2}
    for layer, value in before.items():
        assert after[layer] < 0.95 * value, (layer, value, after[layer])


def test_trainable_parameters_per_mode(tiny_converted):
    model = load_converted(tiny_converted)
    new = {n for n, p in configure_trainable(model, Stage(train="new"), 0)[0].named_parameters() if p.requires_grad}
    assert new == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(3) for m in ("f_proj", "g_norm")}
    full, _ = configure_trainable(load_converted(tiny_converted), Stage(train="full"), 0)
    assert all(p.requires_grad for p in full.parameters())
    _, names = configure_trainable(load_converted(tiny_converted), Stage(train="lora"), 0)
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in names)
    assert {n.split(".")[-4] for n in names if "lora_" in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert sum("f_proj" in n for n in names) == 3 and sum("g_norm" in n for n in names) == 3


def test_frozen_weights_stay_bitwise_identical(tiny_converted, corpus_files, tmp_path):
    run = finetune(str(tiny_converted), tmp_path / "run", corpus_files, RECIPE, progress=False)
    base = load_converted(tiny_converted).state_dict()
    after_new = rebuild_model(run, upto=1).state_dict()
    after_lora = rebuild_model(run, upto=2).state_dict()
    for name, t in base.items():
        new_param = ".f_proj." in name or ".g_norm." in name
        assert torch.equal(after_new[name], t) != new_param, name
        lora_target = any(f".self_attn.{p}_proj." in name for p in "qv")  # the recipe's LoRA targets
        assert torch.equal(after_lora[name], t) == (not new_param and not lora_target), name


@pytest.mark.parametrize("stop", [3, 8])
def test_resume_continues_exactly(tiny_converted, corpus_files, tmp_path, stop):
    full = finetune(str(tiny_converted), tmp_path / "full", corpus_files, RECIPE, progress=False)
    part = tmp_path / "part"
    finetune(str(tiny_converted), part, corpus_files, RECIPE, stop_after=stop, progress=False)
    assert read_run(part).status == "running"
    stage = 0 if stop < 6 else 1  # each stage of the tiny recipe has 6 steps; checkpoints belong to their stage
    assert sorted(p.relative_to(part).as_posix() for p in (part / "checkpoints").rglob("step-*")) == [
        f"checkpoints/stage-{stage:02d}/step-{stop:07d}"
    ]
    finetune(str(tiny_converted), part, corpus_files, RECIPE, resume=True, progress=False)
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(stop + 1, 13):
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    for stage in ("00-transfer.safetensors",):
        ta, tb = tensors(full / "stages" / stage), tensors(part / "stages" / stage)
        assert all(rel_err(tb[k], ta[k]) <= 1e-6 for k in ta)


def _torchrun(nproc: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + os.getpid() % 1000 + nproc),
        "-m",
        "t2r.cli",
        "finetune",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny_converted, corpus_files, tmp_path, kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [
        "--recipe",
        RECIPE,
        *[arg for f in corpus_files for arg in ("--data", f)],
        "--set",
        f"distributed={kind}",
        "--set",
        "grad_accum=1",
        "--device",
        "cpu",
    ]
    one = _torchrun(1, [str(tiny_converted), str(tmp_path / "one"), *common, "--set", "micro_batch_size=4"], env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, [str(tiny_converted), str(tmp_path / "two"), *common, "--set", "micro_batch_size=2"], env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert read_run(tmp_path / "two").world_size == 2


@pytest.mark.parametrize(
    "case",
    ["nodata", "empty", "key", "seqlen", "exists", "noresume", "field", "notconverted", "recall", "weight", "modlr",
     "modlrnum"],
)  # fmt: skip
def test_bad_inputs_one_line_errors(tiny_converted, corpus_files, tmp_path, capsys, case):
    out = tmp_path / "run"
    data = ["--data", corpus_files[0]]
    extra: list[str] = []
    model = str(tiny_converted)
    if case == "nodata":
        data, expect = ["--data", str(tmp_path / "*.txt")], "no data files match"
    elif case == "empty":
        (tmp_path / "e.txt").write_text("\n \n")
        data, expect = ["--data", str(tmp_path / "e.txt")], "is empty"
    elif case == "key":
        extra, expect = ["--set", "stages.0.learning_rate=1"], "unknown recipe key 'stages.0.learning_rate'"
    elif case == "seqlen":
        extra, expect = ["--set", "seq_len=100000"], "larger than the whole corpus"
    elif case == "exists":
        out.mkdir()
        (out / "x").write_text("x")
        expect = "already exists and is not empty"
    elif case == "noresume":
        extra, expect = ["--resume"], "nothing to resume"
    elif case == "field":
        (tmp_path / "x.jsonl").write_text('{"content": "hello"}\n')
        data, expect = ["--data", str(tmp_path / "x.jsonl")], "has no field 'text'"
    elif case == "recall":
        extra, expect = ["--set", "data.recall_fraction=1.5"], "data.recall_fraction must be >= 0 and <= 1, got 1.5"
    elif case == "weight":
        extra, expect = (
            ["--set", "data.recall_answer_weight=0"],
            "data.recall_answer_weight must be > 0 and <= 1000, got 0",
        )
    elif case == "modlr":  # a misspelt module, or a hybrid's recipe on a model without a window: found up front
        extra = ["--set", "stages.1.module_lr.window_mix=1e-2"]
        expect = "stages.1 (lm): module_lr names 'window_mix', which this model does not have"
    elif case == "modlrnum":
        extra, expect = ["--set", "stages.1.module_lr.f_proj=fast"], "module_lr.f_proj must be a number, got 'fast'"
    else:
        model, expect = str(tmp_path), "not a model directory"
    code, lines = run_cli(["finetune", model, str(out), *data, "--recipe", RECIPE, *extra], capsys)
    assert code == 1 and lines[-1].startswith("t2r: error: ") and expect in lines[-1], lines
    if case in ("modlr", "modlrnum"):
        assert not out.exists()  # found before the run directory is written, not when the stage starts


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_converted, corpus_files, tmp_path, capsys, monkeypatch
):
    import t2r.train.trainer as trainer

    calls = []
    real = trainer.ce_loss_sum

    def diverging(*args, **kwargs):  # the training loss turns to NaN from the third step on (2 micro-batches each)
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(trainer, "ce_loss_sum", diverging)
    out = tmp_path / "run"
    args = ["finetune", str(tiny_converted), str(out), "--data", corpus_files[0], "--recipe", RECIPE]
    args += ["--set", "checkpoint_every=1", "--set", "stages=[{name: lm, train: new, steps: 6, loss: {ce: 1}}]"]
    code, lines = run_cli(args, capsys)
    assert code == 1 and "non-finite loss at step" in lines[-1], lines
    good = sorted((out / "checkpoints").rglob("step-*"))
    assert good and str(good[-1]) in lines[-1]
    assert not list(out.rglob("*.t2r-tmp-*"))
    meta = json.loads((good[-1] / "state.json").read_text())
    assert meta["state"]["global_step"] == int(good[-1].name.split("-")[1])


def test_recipe_files_load():
    root = Path(RECIPE).parent
    for path in root.glob("*.yaml"):
        recipe = load_recipe(path)
        assert recipe.stages, path


def test_transfer_gradients_stay_inside_each_layer(tiny_converted):
    """Teacher forcing: layer 0's gate gradient comes from layer 0's error alone (fails if later layers'
    errors leaked back through the hidden states)."""

    class OnlyLayer0(TransferCollector):
        def add(self, layer_idx, student, teacher, token_mask):
            if layer_idx == 0:
                super().add(layer_idx, student, teacher, token_mask)

    batch = {"input_ids": torch.randint(3, 100, (2, 40)), "position_ids": torch.arange(40).expand(2, 40)}
    grads = []
    for collector in (TransferCollector(), OnlyLayer0()):
        model = load_converted(tiny_converted)
        model, _ = configure_trainable(model, Stage(train="new"), 0)
        loss, _ = transfer_loss_sum(model, batch, collector)
        loss.backward()
        grads.append(model.model.layers[0].self_attn.f_proj.weight.grad.clone())
        assert model.model.layers[1].self_attn.f_proj.weight.grad is not None or collector.layers == 1
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("per_token", [False, True], ids=["mix-per-head", "mix-per-token"])
def test_hybrid_model_trains_its_window_mix(tmp_path, corpus_files, tiny_converted, per_token):
    from t2r.convert import ConvertOptions, convert

    teacher = json.loads((tiny_converted / "conversion.json").read_text())["source"]["path"]
    options = ConvertOptions(num_slots=16, window=8, window_mix_per_token=per_token, window_sink=False)
    hybrid = convert(teacher, tmp_path / "hybrid", options, progress=False)
    run = finetune(str(hybrid), tmp_path / "run", corpus_files, RECIPE, progress=False)
    delta = tensors(run / "stages" / "00-transfer.safetensors")
    assert {k.split(".")[-2] for k in delta} == {"f_proj", "g_norm", "window_mix"} | ({"proj"} if per_token else set())
    base = load_converted(hybrid).state_dict()
    final = rebuild_model(run).state_dict()
    mixes = ["window_mix.weight"] + ["window_mix.proj.weight"] * per_token
    for i in range(3):
        for mix in mixes:
            name = f"model.layers.{i}.self_attn.{mix}"
            assert not torch.equal(final[name], base[name]), name
    # The export (which itself checks step decoding against the parallel forward) loads as the trained model.
    from transformers import AutoModelForCausalLM

    from t2r.export.exporter import export

    exported = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "exp", dtype="fp32")).eval()
    ids = torch.randint(3, 90, (2, 24))
    with torch.no_grad():
        assert rel_err(exported(ids).logits, rebuild_model(run).eval()(ids).logits) <= 1e-6


@torch.no_grad()
def test_output_norm_calibration_matches_teacher_scale(tiny_converted, corpus_files):
    from transformers import AutoTokenizer

    from t2r.train.teacher_attention import calibrate_output_norms, calibration

    rows = pack_documents(
        tokenize_documents(load_documents(corpus_files), AutoTokenizer.from_pretrained(tiny_converted)), 64
    )
    model = load_converted(tiny_converted).eval()
    batch = rows.batch(list(range(6)))
    weights = calibrate_output_norms(model, [batch])
    assert set(weights) == {f"model.layers.{i}.self_attn.g_norm.weight" for i in range(3)}
    collector = TransferCollector()  # measure again: per-channel RMS now equal to the teacher's
    with calibration(model, collector):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    for gsa_sq, teacher_sq in collector.channel_sq.values():
        assert rel_err(gsa_sq.sqrt(), teacher_sq.sqrt()) <= 1e-4


def test_run_records_and_reapplies_the_calibration(tiny_run):
    run = read_run(tiny_run)
    assert [p.name for p in run.prelude] == ["calibrate"]
    assert run.calibrated_eval["eval_ppl"] > 1
    calibrated = tensors(tiny_run / run.prelude[0].output)
    model = rebuild_model(tiny_run, upto=0).state_dict()
    assert all(torch.equal(model[k], v) for k, v in calibrated.items())


def test_recall_rows_are_mixed_into_training(tiny_converted, corpus_files, tmp_path):
    overrides = ["seq_len=256", "micro_batch_size=1", "data.recall_fraction=0.5", "data.recall_answer_weight=10"]
    overrides += ["stages.0.steps=2"]
    overrides += ["stages.1.steps=2", "eval_every=0", "checkpoint_every=0"]
    run_dir = finetune(str(tiny_converted), tmp_path / "run", corpus_files, RECIPE, overrides, progress=False)
    stats = read_run(run_dir).data_stats
    assert 0.25 * stats["train_rows"] < stats["recall_rows"] < 0.75 * stats["train_rows"]


def test_full_finetune_of_tied_embeddings_saves_resumes_and_rebuilds(corpus_files, tmp_path):
    """Full finetuning on CPU writes a tied model's checkpoints and stage output, and the tie survives."""
    from conftest import save_tiny_teacher

    from t2r.convert import ConvertOptions, convert

    save_tiny_teacher(tmp_path / "teacher", tie_word_embeddings=True)
    conv = convert(str(tmp_path / "teacher"), tmp_path / "conv", ConvertOptions(num_slots=16), progress=False)
    sets = ["stages.1.train=full", "stages.1.lr=0.001", "checkpoint_every=3"]
    full = finetune(str(conv), tmp_path / "full", corpus_files, RECIPE, sets, progress=False)
    part = tmp_path / "part"
    finetune(str(conv), part, corpus_files, RECIPE, sets, stop_after=9, progress=False)
    finetune(str(conv), part, corpus_files, RECIPE, sets, resume=True, progress=False)
    a, b = train_losses(full), train_losses(part)
    assert all(abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])) for s in range(10, 13)), (a, b)
    base, model = load_converted(conv), rebuild_model(full)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert rel_err(model.model.embed_tokens.weight, base.model.embed_tokens.weight) > 1e-4


@pytest.mark.parametrize("mode", ["new", "lora"])
def test_window_sink_is_trained_as_a_new_parameter(mode):
    """The sink's key and value train with the other new parameters, also behind peft's modules_to_save."""
    from conftest import tiny_gsa_model

    from t2r.train.recipe import Stage
    from t2r.train.trainable import configure_trainable

    model = tiny_gsa_model("mistral", gsa_window=8, gsa_window_sink=True)
    model, names = configure_trainable(model, Stage(name="s", train=mode), 0)
    model(input_ids=torch.randint(3, 100, (2, 30))).logits.sum().backward()
    sinks = [(n, p) for n, p in model.named_parameters() if "window_sink" in n and p.requires_grad]
    assert len(sinks) == 6 and all(n in names for n, _ in sinks)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in sinks)


def test_report_to_mirrors_the_log_to_tensorboard_and_wandb(tiny_converted, corpus_files, tmp_path, monkeypatch):
    """--report-to: every numeric log entry also reaches TensorBoard's writer and wandb (stand-ins record the
    calls); a reporter whose package is missing is a one-line error before the run starts."""
    import types

    calls = {"tb": [], "wandb": []}

    class Writer:
        def __init__(self, log_dir):
            calls["tb_dir"] = log_dir

        def add_scalar(self, key, value, step):
            calls["tb"].append((key, value, step))

        def close(self):
            calls["tb_closed"] = True

    class Run:
        def log(self, numbers, step=None):
            calls["wandb"].append((numbers, step))

        def finish(self):
            calls["wandb_finished"] = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run()))
    sets = ["report_to=[jsonl, tensorboard, wandb]", "stages.0.steps=2", "stages.1.steps=2"]
    run = finetune(str(tiny_converted), tmp_path / "run", corpus_files, RECIPE, sets, progress=False)
    assert calls["tb_dir"] == str(run / "tensorboard") and calls["tb_closed"] and calls["wandb_finished"]
    assert {k for k, _, _ in calls["tb"]} >= {"train/loss", "train/lr", "eval/eval_ppl"}
    assert [s for _, _, s in calls["tb"] if s is not None] and all(isinstance(n, dict) for n, _ in calls["wandb"])
    assert len(train_losses(run)) == 4  # the jsonl log is written as always
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(T2RError, match="report_to wandb needs the wandb package"):
        finetune(str(tiny_converted), tmp_path / "run2", corpus_files, RECIPE, ["report_to=[wandb]"], progress=False)
    assert not (tmp_path / "run2").exists()


def _children(pid: int) -> list[int]:
    """Processes whose parent is PID (from /proc: no psutil needed)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def test_killing_one_rank_then_resuming_reproduces_the_run(tiny_converted, corpus_files, tmp_path):
    """Two processes (gloo): one rank is SIGKILLed mid-run, torchrun takes the other down, and --resume with two
    processes again gives the uninterrupted run's losses."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--recipe", RECIPE, *[arg for f in corpus_files for arg in ("--data", f)], "--set", "grad_accum=1",
              "--set", "micro_batch_size=2", "--set", "checkpoint_every=2", "--device", "cpu"]  # fmt: skip
    full = _torchrun(2, [str(tiny_converted), str(tmp_path / "full"), *common], env)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "run"
    port = str(29800 + os.getpid() % 100)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "t2r.cli", "finetune", str(tiny_converted), str(run), *common]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while (time.time() < deadline and not (run / "log.jsonl").is_file()) or 3 not in train_losses(run):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # the second worker: rank 1
    assert proc.wait(timeout=120) != 0
    resumed = _torchrun(2, [str(tiny_converted), str(run), *common, "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = train_losses(tmp_path / "full"), train_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
