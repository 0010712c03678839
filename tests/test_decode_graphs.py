"""Captured decoding steps (t2r.models.decode_graphs) against eager decoding.

On the CPU the runner emulates its graphs: a replay reruns the captured call against the capture-time cache, its
Python-side state put back as at capture, so a step that depended on anything outside its buffers diverges here
as a real CUDA graph would. benchmarks/gpu/decode_graphs_check.py runs the same comparisons on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_gsa_model

from t2r.kernels.pdl import pdl
from t2r.kernels.tuning import TUNING
from t2r.models.decode_graphs import DecodeGraphs
from t2r.models.hf_compat import CACHE_ARG, output_cache

VARIANTS = {
    "gsa": dict(),
    "gsa+rope": dict(gsa_use_rope=True),
    "hybrid": dict(gsa_window=4, gsa_window_mix_per_token=True, gsa_window_sink=True),
}


def _graphed(model, emulate: bool = True):
    model.decode_graphs = DecodeGraphs(enabled=True, emulate=emulate)
    return model


@torch.no_grad()
def _decode(model, prompt, steps: int, mask=None, cache=None):
    """Greedy decoding by hand: the logits of every step, and the cache."""
    logits = []
    out = model(input_ids=prompt, attention_mask=mask, **{CACHE_ARG: cache}, use_cache=True)
    cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, **{CACHE_ARG: cache}, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return (torch.stack(logits, 1) if logits else None), cache


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_replayed_steps_match_eager_decoding(variant):
    model = tiny_gsa_model("mistral", **VARIANTS[variant])
    prompt = torch.randint(3, 100, (2, 7))
    eager, _ = _decode(model, prompt, 9)  # the window (4) wraps twice
    graphed, cache = _decode(_graphed(model), prompt, 9)
    assert len(model.decode_graphs.steps) == 1  # one capture, then replays
    assert rel_err(graphed, eager) < 1e-6
    assert cache.get_seq_length() == 7 + 9


def test_dependent_launches_only_where_a_gpu_has_them(monkeypatch):
    """T2R_GSA_PDL: on by default, and then only CUDA devices of compute capability 9+ launch so (the interpreter
    has no such launch); off, none."""
    assert TUNING.pdl
    assert not pdl(torch.device("cpu"))
    if torch.cuda.is_available():
        assert pdl(torch.device("cuda", torch.cuda.current_device())) == (torch.cuda.get_device_capability()[0] >= 9)
        monkeypatch.setattr(TUNING, "pdl", False)
        assert not pdl(torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures real CUDA graphs of dependent launches")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dependent_launches_and_fused_maps_replay_eager_steps(variant, monkeypatch):
    """T2R_GSA_PDL (each kernel's early reads overlapping the kernel before) and T2R_GSA_FUSED_MAPS, in real CUDA
    graphs: the logits of eager decoding with both off."""
    model = tiny_gsa_model("mistral", **VARIANTS[variant]).cuda()
    prompt = torch.randint(3, 100, (2, 7), device="cuda")
    monkeypatch.setattr(TUNING, "pdl", False)
    monkeypatch.setattr(TUNING, "fused_maps", False)
    eager, _ = _decode(model, prompt, 9)
    monkeypatch.setattr(TUNING, "pdl", True)
    monkeypatch.setattr(TUNING, "fused_maps", True)
    graphed, _ = _decode(_graphed(model, emulate=False), prompt, 9)
    assert len(model.decode_graphs.steps) == 1
    assert rel_err(graphed, eager) < 1e-5


def test_positions_and_padding_reach_the_replayed_step():
    """Left-padded rows: each row's positions and padding mask come from the inputs, not from the capture."""
    model = tiny_gsa_model("llama", **VARIANTS["hybrid"])
    prompt = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    eager = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)  # fmt: skip
    graphed = _graphed(model).generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)  # fmt: skip
    assert model.decode_graphs.steps, "generate()'s decoding steps did not take the captured path"
    assert torch.equal(graphed.sequences, eager.sequences)
    assert rel_err(torch.stack(graphed.logits), torch.stack(eager.logits)) < 1e-6


def test_a_forgotten_input_would_show():
    """The emulation is strict: a step whose positions are not copied in replays the capture's positions."""
    model = tiny_gsa_model("mistral", **VARIANTS["hybrid"])
    prompt = torch.randint(3, 100, (1, 5))
    eager, _ = _decode(model, prompt, 6)
    graphs = _graphed(model).decode_graphs
    original = graphs.step

    def forgetful_step(model, input_ids, position_ids, attention_mask, cache):
        for step in graphs.steps.values():
            step.positions = step.positions.clone()  # the captured call keeps reading the old buffer
        return original(model, input_ids, position_ids, attention_mask, cache)

    graphs.step = forgetful_step
    broken, _ = _decode(model, prompt, 6)
    assert rel_err(broken, eager) > 1e-4  # (the correct step: < 1e-6)


def test_caches_taking_turns_keep_their_own_memories():
    model = tiny_gsa_model("mistral", **VARIANTS["hybrid"])
    a, b = torch.randint(3, 100, (2, 1, 6))
    want_a, _ = _decode(model, a, 6)
    want_b, _ = _decode(model, b, 6)
    _graphed(model)
    first_a, cache_a = _decode(model, a, 3)
    got_b, _ = _decode(model, b, 6)  # takes over the captured buffers
    nxt = first_a[:, -1:].argmax(-1)
    rest = []
    for _ in range(3):  # cache a was handed its own copies: it continues where it was
        with torch.no_grad():
            logits = model(input_ids=nxt, **{CACHE_ARG: cache_a}, use_cache=True).logits
        rest.append(logits[:, -1])
        nxt = logits[:, -1:].argmax(-1)
    assert len(model.decode_graphs.steps) == 1
    assert rel_err(got_b, want_b) < 1e-6
    assert rel_err(torch.cat([first_a, torch.stack(rest, 1)], 1), want_a) < 1e-6


def test_moved_or_replaced_weights_drop_the_captured_steps():
    model = tiny_gsa_model("mistral")
    prompt = torch.randint(3, 100, (1, 5))
    _decode(_graphed(model), prompt, 2)
    proj = model.model.layers[0].mlp.down_proj
    proj.weight.data = proj.weight.data * 2  # new storage: a graph would read the old one
    eager_model = tiny_gsa_model("mistral")
    eager_model.model.layers[0].mlp.down_proj.weight.data *= 2
    got, _ = _decode(model, prompt, 3)
    want, _ = _decode(eager_model, prompt, 3)
    assert rel_err(got, want) < 1e-6
    model.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)  # any new module: graphs are recaptured
    version = model.decode_graphs._version
    _decode(model, prompt, 1)
    assert model.decode_graphs._version != version


def test_steps_a_graph_cannot_hold_run_eagerly():
    model = _graphed(tiny_gsa_model("mistral", gsa_full_attention_layers=[1]))  # a growing KV cache
    _decode(model, torch.randint(3, 100, (1, 5)), 3)
    assert not model.decode_graphs.steps
    model = _graphed(tiny_gsa_model("mistral"))
    _, cache = _decode(model, torch.randint(3, 100, (1, 5)), 0)
    model(input_ids=torch.randint(3, 100, (1, 1)), **{CACHE_ARG: cache}, use_cache=True)  # gradients on
    model.train()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, 1)), **{CACHE_ARG: cache}, use_cache=True)
    model.eval()
    assert not model.decode_graphs.steps
    model.decode_graphs.enabled = False
    _decode(model, torch.randint(3, 100, (1, 5)), 2)
    assert not model.decode_graphs.steps


def test_a_step_that_cannot_be_captured_falls_back_once(monkeypatch):
    model = _graphed(tiny_gsa_model("mistral"))
    prompt = torch.randint(3, 100, (1, 5))
    calls = []

    def refuse(*args):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(model.decode_graphs, "_capture", refuse)
    got, _ = _decode(model, prompt, 4)
    model.decode_graphs.enabled = False
    want, _ = _decode(model, prompt, 4)
    assert rel_err(got, want) < 1e-6
    assert len(calls) == 1  # the shape is remembered as failed


def test_copied_models_capture_their_own_steps():
    import copy

    model = _graphed(tiny_gsa_model("mistral"))
    _decode(model, torch.randint(3, 100, (1, 5)), 2)
    twin = copy.deepcopy(model)
    assert not twin.decode_graphs.steps and twin.decode_graphs.emulate


def test_a_compiled_step_matches_eager_decoding():
    """The captured step may run through torch.compile (fused kernels); traced here with Dynamo's eager backend."""
    model = tiny_gsa_model("mistral", **VARIANTS["hybrid"])
    prompt = torch.randint(3, 100, (2, 6))
    eager, _ = _decode(model, prompt, 5)
    model.decode_graphs = DecodeGraphs(enabled=True, emulate=True, compile="eager")
    compiled, _ = _decode(model, prompt, 5)
    assert len(model.decode_graphs.steps) == 1 and not model.decode_graphs.failed
    assert rel_err(compiled, eager) < 1e-6


def test_a_compiled_hybrid_step_takes_the_fused_window(monkeypatch):
    """With the kernels on (Triton's interpreter here), the compiled step's window runs as the fused custom op, not
    as the PyTorch ring Inductor would trace, and decodes as the eager model does (the ring wraps twice)."""
    pytest.importorskip("triton")
    from t2r.kernels import window
    from t2r.kernels.tuning import TUNING

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernels take CUDA tensors only
    if device == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    model = tiny_gsa_model("mistral", **VARIANTS["hybrid"]).to(device)
    assert model.config.head_dim & (model.config.head_dim - 1) == 0  # a head dim the fused step takes
    prompt = torch.randint(3, 100, (2, 6), device=device)
    eager, _ = _decode(model, prompt, 9)
    calls = []
    kernel = window.window_decode_triton
    monkeypatch.setattr(window, "window_decode_triton", lambda *a: calls.append(1) or kernel(*a))
    model.decode_graphs = DecodeGraphs(enabled=True, emulate=True, compile="aot_eager")
    compiled, _ = _decode(model, prompt, 9)
    assert len(model.decode_graphs.steps) == 1 and not model.decode_graphs.failed
    assert calls  # the op's body: only a compiled graph goes through it
    assert rel_err(compiled, eager) < 1e-5


def test_inference_mode_and_no_grad_take_turns():
    model = _graphed(tiny_gsa_model("mistral"))
    prompt = torch.randint(3, 100, (1, 5))
    want, _ = _decode(model, prompt, 3)  # no_grad
    with torch.inference_mode():
        got, _ = _decode(model, prompt, 3)
    again, _ = _decode(model, prompt, 3)
    assert len(model.decode_graphs.steps) == 2
    assert rel_err(got, want) < 1e-6 and rel_err(again, want) < 1e-6


def test_beam_search_reorders_the_captured_memories():
    """Beam search reorders the cache between steps (new tensors): each replay first takes them in."""
    model = tiny_gsa_model("mistral", **VARIANTS["hybrid"])
    prompt = torch.randint(3, 100, (2, 6))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=False, length_penalty=0.0)
    want = model.generate(prompt, **kw)
    got = _graphed(model).generate(prompt, **kw)
    assert model.decode_graphs.steps
    assert torch.equal(got, want)


def test_training_mode_drops_the_captured_steps():
    model = _graphed(tiny_gsa_model("mistral"))
    prompt = torch.randint(3, 100, (1, 5))
    want, cache = _decode(model, prompt, 2)
    model.train()
    assert not model.decode_graphs.steps
    model.eval()
    with torch.no_grad():  # the cache got its own copies of the memories: decoding continues from it
        nxt = want[:, -1:].argmax(-1)
        got = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True).logits
    model.decode_graphs.enabled = False
    _, fresh = _decode(model, prompt, 2)
    with torch.no_grad():
        expected = model(input_ids=nxt, **{CACHE_ARG: fresh}, use_cache=True).logits
    assert rel_err(got, expected) < 1e-6


def test_models_split_over_devices_or_compiled_by_the_caller_decode_eagerly():
    model = tiny_gsa_model("mistral")
    prompt = torch.randint(3, 100, (1, 5))
    want, _ = _decode(model, prompt, 3)
    # as accelerate's device_map="auto" leaves a model split over two GPUs
    _graphed(model).hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    got, _ = _decode(model, prompt, 3)
    assert not model.decode_graphs.steps and rel_err(got, want) < 1e-6
    del model.hf_device_map
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    got, _ = _decode(compiled, prompt, 3)
    assert not model.decode_graphs.steps and rel_err(got, want) < 1e-6
