"""The graphed training step (recipe ``graphs: true``): packed layouts planned on the host into fixed buffers
(StaticPlan) compute what the exact plans do, and a finetune stage of graphed micro-batches trains as eager ones.

Off a GPU the step's graphs are emulated (t2r.train.graphed_step): every replay runs under NoHostReads, which fails
what a capture cannot run (reading a tensor back, sizing an output by its values)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, rel_err

from t2r.kernels.tuning import TUNING
from t2r.train.trainer import finetune

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp overflow in masked lanes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels(monkeypatch):
    pytest.importorskip("triton")
    import t2r.kernels.chunk as chunk

    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    return chunk


def _op_with_grads(chunk, inputs, cu):
    for x in inputs:
        x.grad = None
    o, _ = chunk.gsa_chunk_triton(*inputs, 0.25, None, False, cu)
    torch.manual_seed(7)
    (o * torch.randn_like(o)).sum().backward()
    return [o.detach(), *(x.grad.clone() for x in inputs)]


@pytest.mark.parametrize("parts", [1, 0])
def test_a_static_plan_computes_what_the_exact_plan_does(kernels, monkeypatch, parts):
    """Documents of 13, 27, 1 and 39 tokens over 2 rows of 40 (one of a single token, one across two segments'
    worth), in a plan with room for 8 of them: the padding's empty sequences and segments read and write nothing
    (outputs and every gradient as with the exact plan; unwritten buffers are NaN-filled), and the call reads no
    bound back (the exact plans' path is not taken). Scans in one walk, and in automatic parts."""
    monkeypatch.setattr(TUNING, "poison", True)
    monkeypatch.setattr(TUNING, "scan_parts", parts)
    inputs, _ = make_inputs(1, 80, 4, 2, 16, 16, 16, state=False, device=DEVICE)
    cu = torch.tensor([0, 13, 40, 41, 80])
    want = _op_with_grads(kernels, inputs, cu.to(DEVICE))
    plan = kernels.StaticPlan(2, 40, 9, torch.device(DEVICE), TUNING.segment)
    plan.fill(cu)

    def no_reads(*args):
        raise AssertionError("a static layout was read back")

    monkeypatch.setattr(kernels, "_packed_plan", no_reads)
    got = _op_with_grads(kernels, inputs, plan.bounds)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-5
    plan.fill(torch.tensor([0, 40, 80]))  # refilled: one document per row
    monkeypatch.setattr(kernels, "_packed_plan", kernels.LastTensorMemo(lambda c, d, s: kernels._Plan(1, 0, c, d, s)))
    want = _op_with_grads(kernels, inputs, torch.tensor([0, 40, 80], device=DEVICE))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(_op_with_grads(kernels, inputs, plan.bounds), want, strict=True))


def test_a_static_plan_refuses_layouts_beyond_its_capacity(kernels):
    plan = kernels.StaticPlan(1, 64, 3, torch.device(DEVICE), 16)
    plan.fill(torch.tensor([0, 5, 64]))  # two documents: the third sequence stays the padding's
    with pytest.raises(ValueError, match="do not fit"):
        plan.fill(torch.tensor([0, 5, 9, 64]))
    with pytest.raises(ValueError, match="do not fit"):
        plan.fill(torch.tensor([0, 5, 60]))  # not the rows' tokens


def test_host_reads_fail_inside_an_emulated_replay():
    from t2r.train.graphed_step import NoHostReads

    x = torch.arange(6)
    with NoHostReads():
        x.cumsum(0)
        torch.repeat_interleave(x, x, output_size=15)  # sized by the caller: no read
        for read in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: bool(x.any())):
            with pytest.raises(RuntimeError, match="reads a tensor on the host"):
                read()


GRAPHED_RECIPE = """
seq_len: 32
micro_batch_size: 2
grad_accum: 2
precision: fp32
eval_every: 0
eval_rows: 2
checkpoint_every: 0
calibrate_rows: 0
stages:
  - name: lm
    train: lora
    steps: 2
    lr: 0.003
    warmup_steps: 1
    loss: {ce: 1.0}
    lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}
"""


@pytest.fixture(scope="module")
def kernel_model(tmp_path_factory):
    """A tiny teacher whose shapes the GSA kernels take (head dim 16, GQA groups of 2), converted."""
    from conftest import save_tiny_teacher

    from t2r.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("graphed")
    (root / "recipe.yaml").write_text(GRAPHED_RECIPE)
    teacher = save_tiny_teacher(root / "teacher", "mistral", hidden_size=64, num_attention_heads=4)
    return convert(str(teacher), root / "converted", ConvertOptions(num_slots=16), progress=False), root / "recipe.yaml"


def _finetune(kernel_model, corpus_files, out, *overrides):
    model, recipe = kernel_model
    run = finetune(str(model), out, corpus_files, str(recipe), list(overrides), progress=False)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    said = [{k: e[k] for k in ("stage", "on", "why") if k in e} for e in log if e["type"] == "graphs"]
    losses = {(e["step"], k): e[k] for e in log if e["type"] == "train" for k in ("loss", "ce", "kd") if k in e}
    return losses, said


KD = "stages.0.loss.kd=0.5"  # distillation from the shared teacher (the student's softmax twins, adapters off)


@pytest.fixture(scope="module")
def eager_runs(kernel_model, corpus_files, tmp_path_factory):
    """Each loss set's eager losses, run once."""
    runs = {}

    def losses(*overrides: str) -> dict:
        if overrides not in runs:
            with pytest.MonkeyPatch.context() as mp:
                if DEVICE == "cpu":
                    mp.setattr(TUNING, "impl", "triton")
                got, said = _finetune(kernel_model, corpus_files, tmp_path_factory.mktemp("eager") / "run", *overrides)
            assert got and not said
            runs[overrides] = got
        return runs[overrides]

    return losses


def _close(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and max(abs(got[k] - want[k]) / abs(want[k]) for k in want) <= 1e-5


@pytest.mark.parametrize("losses", [(KD,), (KD, "stages.0.train=full")], ids=["lora+kd", "full+kd"])
def test_graphed_micro_batches_train_as_eager_ones(
    kernels, kernel_model, corpus_files, eager_runs, tmp_path, monkeypatch, losses
):
    """A LoRA stage of cross-entropy with distillation from the shared teacher, and a full finetune distilling
    from a separate teacher (2 micro-batches per step, packed rows of several documents) with graphs: the same
    losses as eager steps, the graphs captured once per document capacity and replayed under NoHostReads (the
    teacher's packed mask built on the device, as transformers does under a capture). Which stages refuse graphs,
    and why: test_graphs_say_which_stages_they_cannot_take (each finetune here costs minutes in the interpreter)."""
    import t2r.train.graphed_step as graphed
    import t2r.train.trainer as trainer

    monkeypatch.setattr(trainer, "EMULATE_GRAPHS", True)
    monkeypatch.setattr(graphed, "MIN_DOCUMENTS", 2)  # the interpreter runs every padding program too
    captures, calls = [], []
    capture, call = graphed.GraphedStudentStep._capture, graphed.GraphedStudentStep.__call__
    monkeypatch.setattr(
        graphed.GraphedStudentStep, "_capture", lambda self, key, *a: captures.append(key) or capture(self, key, *a)
    )
    monkeypatch.setattr(graphed.GraphedStudentStep, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    got, said = _finetune(kernel_model, corpus_files, tmp_path / "run", "graphs=true", *losses)
    assert said == [{"stage": "lm", "on": True}]  # and no capture failed (off a GPU: no replay read the host)
    assert captures and len(set(captures)) == len(captures)  # one capture per capacity
    assert len(calls) == 2 * 2  # every micro-batch of the stage
    want = eager_runs(*losses)
    assert {name for _, name in want} == {"loss", "ce", "kd"}
    assert _close(got, want)


def test_a_step_that_cannot_be_graphed_runs_eagerly_and_says_why(
    kernels, kernel_model, corpus_files, eager_runs, tmp_path, monkeypatch
):
    """A capture that fails after its warm-up calls turns graphs off for the stage; the micro-batch runs eagerly,
    with the gradients the warm-up calls added put back."""
    import t2r.train.graphed_step as graphed
    import t2r.train.trainer as trainer

    monkeypatch.setattr(trainer, "EMULATE_GRAPHS", True)
    monkeypatch.setattr(graphed, "MIN_DOCUMENTS", 2)
    calls = []
    forward_backward = graphed.GraphedStudentStep._forward_backward

    def failing_capture(self, *args):
        calls.append(1)
        if len(calls) > self.warmup:
            raise RuntimeError("operation not permitted when stream is capturing")
        forward_backward(self, *args)

    monkeypatch.setattr(graphed.GraphedStudentStep, "_forward_backward", failing_capture)
    losses, said = _finetune(kernel_model, corpus_files, tmp_path / "run", "graphs=true", KD)
    assert [e["on"] for e in said if e["stage"] == "lm"] == [True, False]
    assert said[-1]["why"] == "capture failed: operation not permitted when stream is capturing"
    assert _close(losses, eager_runs(KD))


def test_graphs_say_which_stages_they_cannot_take(monkeypatch):
    import t2r.train.trainer as trainer
    from t2r.train.distributed import DistInfo
    from t2r.train.recipe import Stage, recipe_from_dict

    gpu, cpu = DistInfo(device=torch.device("cuda")), DistInfo()
    recipe = recipe_from_dict({"graphs": True})
    ce, kd = Stage(loss={"ce": 1.0}), Stage(loss={"ce": 1.0, "kd": 0.5})
    assert trainer.graphs_refusal(recipe, ce, gpu) is None
    assert trainer.graphs_refusal(recipe, ce, cpu) == "CUDA graphs need a GPU"
    monkeypatch.setattr(trainer, "EMULATE_GRAPHS", True)
    assert trainer.graphs_refusal(recipe, ce, cpu) is None
    assert trainer.graphs_refusal(recipe, kd, gpu) is None
    transfer = Stage(loss={"transfer": 1.0})
    assert trainer.graphs_refusal(recipe, transfer, gpu) == "not with attention transfer (its hooks run eagerly)"
    assert trainer.graphs_refusal(recipe, Stage(loss={"ce": 1.0, "transfer": 0.0}), gpu) is None
    elsewhere = recipe_from_dict({"graphs": True, "teacher_device": "cuda:1"})
    assert trainer.graphs_refusal(elsewhere, kd, gpu) == "not with the KD teacher on another device (teacher_device)"
    assert trainer.graphs_refusal(elsewhere, ce, gpu) is None
    for teacher_device, on in (("cuda", gpu), ("cuda", DistInfo(device=torch.device("cuda:0"))), ("cuda:0", gpu)):
        same = recipe_from_dict({"graphs": True, "teacher_device": teacher_device})
        assert trainer.graphs_refusal(same, kd, on) is None
    assert trainer.graphs_refusal(recipe, ce, DistInfo(world=2, device=gpu.device)).startswith("one process")
    for key, why in (("compile", "not with compile"), ("gradient_checkpointing", "not with gradient checkpointing")):
        assert trainer.graphs_refusal(recipe_from_dict({"graphs": True, key: True}), ce, gpu) == why


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs them")
def test_graphs_are_off_where_no_gpu_runs_them(kernel_model, corpus_files, tmp_path):
    _, said = _finetune(kernel_model, corpus_files, tmp_path / "run", "graphs=true", "stages.0.steps=1")
    assert {e.get("why") for e in said} == {"CUDA graphs need a GPU"}
