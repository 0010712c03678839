"""torch.compile of converted models: compiled decoder layers compute what eager ones do, the GSA kernels stay
inside the compiled graphs (registered as custom ops), and the trainer and the bench take the option.

Compilation here uses the aot_eager backend (Dynamo and AOT autograd, no code generation), which is what decides
graph breaks and the op's autograd; Inductor's code generation is exercised on the GPU (docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, run_cli, teacher_config, tiny_gsa_model
from test_finetune import RECIPE, train_losses

from t2r.kernels.tuning import TUNING
from t2r.train.compiled import compile_decoder_layers
from t2r.train.distributed import decoder_layers
from t2r.train.trainer import finetune

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp overflow in masked lanes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    pytest.importorskip("triton")
    import t2r.kernels.chunk as kernels

    return kernels


@pytest.fixture
def dynamo_counters():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _compiled_matches_eager(model, counters, device="cpu", T=40):
    torch.manual_seed(1)
    model.to(device)
    ids = torch.randint(3, 101, (2, T), device=device)
    packed = torch.arange(T, device=device).repeat(2, 1)
    packed[1, T // 3 :] -= T // 3  # the second row holds two documents
    model.train()
    eager = [_loss_and_grads(model, ids), _loss_and_grads(model, ids, position_ids=packed)]
    compile_decoder_layers(model, backend="aot_eager")
    compiled = [_loss_and_grads(model, ids), _loss_and_grads(model, ids, position_ids=packed)]
    for (logits, grads), (ref_logits, ref_grads) in zip(compiled, eager, strict=True):
        assert rel_err(logits, ref_logits) <= 1e-6
        assert max(rel_err(a, b) for a, b in zip(grads, ref_grads, strict=True)) <= 1e-6
    return [reason.splitlines()[0] for reason in counters["graph_break"]]


def test_compiled_layers_keep_the_kernels_in_their_graphs(monkeypatch, dynamo_counters):
    """Through the kernels (Triton's interpreter on CPU): plain and packed rows match eager, and Dynamo does not
    break a layer's graph anywhere (the op is a registered custom op, its host-side plans stay inside it)."""
    kernels = _kernels()
    monkeypatch.setattr(TUNING, "impl", "triton")
    small = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_hidden_layers=2)
    model = tiny_gsa_model("mistral", teacher_overrides=small)
    calls = []
    op = kernels._gsa_fwd
    monkeypatch.setattr(kernels, "_gsa_fwd", lambda *a: calls.append(a) or op(*a))
    assert _compiled_matches_eager(model, dynamo_counters, DEVICE, T=24) == []
    assert calls  # the compiled layers called the registered op, not the eager autograd function
    plans = []
    plan_init = kernels._Plan.__init__
    monkeypatch.setattr(kernels._Plan, "__init__", lambda self, *a: plans.append(a) or plan_init(self, *a))
    packed = torch.cat([torch.arange(10), torch.arange(14)]).to(DEVICE)[None].repeat(2, 1)
    _loss_and_grads(model, torch.randint(3, 101, (2, 24), device=DEVICE), position_ids=packed)
    assert len(plans) == 1  # a new layout: planned once for every layer's forward and backward (one device wait)


@pytest.mark.parametrize("hybrid", [{}, dict(gsa_window=8, gsa_window_mix_per_token=True, gsa_window_sink=True)])
def test_compiled_layers_run_the_reference_between_graphs(dynamo_counters, hybrid):
    """Without kernels (CPU, or head dims they do not take) the reference runs as it is, between graphs; the
    hybrid's window attention, per-token mix and sink compile too."""
    breaks = _compiled_matches_eager(tiny_gsa_model("llama", **hybrid), dynamo_counters)
    assert breaks and set(breaks) == {"Skip calling `torch.compiler.disable()`d function"}


@pytest.mark.parametrize("packed", [False, True])
def test_the_kernel_op_passes_torch_opcheck(packed):
    """Schema, fake (meta) implementation against the real one, and the autograd registration of the forward op,
    with an initial state and final states."""
    from conftest import make_inputs

    kernels = _kernels()
    B, T = (1, 40) if packed else (2, 20)
    inputs, h0 = make_inputs(B, T, 4, 2, 16, 16, 16, N=2, device=DEVICE)
    flat = [x.detach().reshape(B * T, *x.shape[2:]).requires_grad_() for x in inputs]
    cu = torch.tensor([0, 13, 40], device=DEVICE) if packed else None
    torch.library.opcheck(kernels._gsa_fwd, (*flat, B, 16**-0.5, *h0, cu, True, True))


def test_the_kernel_ops_stay_out_of_cuda_graphs():
    """A CUDA graph would replay the kernels with the plan of its recording: a packed batch's old layout."""
    kernels = _kernels()
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for op in (kernels._gsa_fwd, kernels._gsa_bwd):
        assert torch.Tag.cudagraph_unsafe in op._opoverload.tags


def test_finetune_with_compile_trains_as_eager(tiny_converted, corpus_files, tmp_path, monkeypatch):
    """``compile: true`` in a recipe: the same losses as eager over a transfer stage (left eager) and a LoRA stage
    with KD from the shared teacher (attention modes switch inside the compiled layers), within Dynamo's limits."""
    import torch._dynamo

    import t2r.train.trainer

    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # not a silent fall to eager
    compiled_layers = []

    def compile_for_test(model):
        compiled_layers.extend(decoder_layers(compile_decoder_layers(model, backend="aot_eager")))
        return model

    eager = train_losses(finetune(str(tiny_converted), tmp_path / "eager", corpus_files, RECIPE, progress=False))
    monkeypatch.setattr(t2r.train.trainer, "compile_decoder_layers", compile_for_test)
    run = finetune(str(tiny_converted), tmp_path / "compiled", corpus_files, RECIPE, ["compile=true"], progress=False)
    compiled = train_losses(run)
    layers = teacher_config("llama").num_hidden_layers
    assert len(compiled_layers) == layers  # the LoRA stage only
    assert all(layer._compiled_call_impl is not None for layer in compiled_layers)
    assert compiled.keys() == eager.keys()
    assert max(abs(compiled[k] - eager[k]) / abs(eager[k]) for k in eager) <= 1e-4


def test_bench_train_compile_compiles_both_sides(tiny_converted, tmp_path, capsys, monkeypatch):
    import json

    import t2r.train.compiled

    compiled = []
    monkeypatch.setattr(t2r.train.compiled, "compile_decoder_layers", lambda m: compiled.append(type(m).__name__) or m)
    out = tmp_path / "rows.json"
    args = ["bench", "train", str(tiny_converted), "--device", "cpu", "--seq", "16", "--batch", "1", "--steps", "1"]
    code, _ = run_cli([*args, "--compile", "--json", str(out)], capsys)
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["GSA (full, compiled)", "teacher SDPA (full, compiled)"]
    assert compiled == ["T2RLlamaForCausalLM", "LlamaForCausalLM"]
