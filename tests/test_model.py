"""Converted-model behaviour: decode paths agree, generate() works with the recurrent cache, padding and
packing are exact, and checkpoints round-trip (also through trust_remote_code without t2r)."""

from __future__ import annotations

import contextlib
import json
import textwrap
import warnings

import pytest
import torch
from conftest import rel_err, run_without_t2r, tiny_gsa_model
from transformers import AutoModelForCausalLM

from t2r.models import GSACache
from t2r.models.hf_compat import output_cache
from t2r.models.modeling_t2r import GSAAttention


def prefill_then_decode(model, ids, cut):
    out = model(ids[:, :cut], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(cut, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize(
    "gsa",
    [
        dict(gsa_use_rope=False),
        dict(gsa_use_rope=True),
        dict(gsa_full_attention_layers=[1]),
        dict(gsa_feature_map="relu"),
        dict(gsa_window=8, gsa_window_mix_init=0.5),
        dict(gsa_window=1),
    ],
)
@torch.no_grad()
def test_decode_matches_full_forward(arch, gsa):
    model = tiny_gsa_model(arch, **gsa)
    ids = torch.randint(3, 101, (2, 90))
    full = model(ids, use_cache=False).logits
    inc, cache = prefill_then_decode(model, ids, cut=37)
    assert rel_err(inc, full) <= 1e-4
    assert isinstance(cache, GSACache) and cache.get_seq_length() == 90


def test_layers_converted_as_configured(arch):
    model = tiny_gsa_model(arch, gsa_full_attention_layers=[2])
    kinds = [type(layer.self_attn) is GSAAttention for layer in model.model.layers]
    assert kinds == [True, True, False]
    attn = model.model.layers[0].self_attn
    assert attn.f_proj.weight.shape == (model.config.num_key_value_heads * 16, model.config.hidden_size)
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    assert (attn.q_norm is not None) == (arch == "qwen3")


@torch.no_grad()
def test_generate_with_and_without_cache_agree():
    model = tiny_gsa_model("mistral", gsa_use_rope=True)
    ids = torch.randint(3, 101, (1, 12))
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (1, 36)
    assert torch.equal(with_cache, without)


@torch.no_grad()
def test_cache_is_taken_under_either_name_and_without_deprecation_warnings(caplog):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``: both names must decode alike on every supported
    release (with a full-attention layer and a window, whose teacher attention takes the installed release's
    name), and neither t2r's calls nor generate() may trigger transformers' deprecation warnings."""
    model = tiny_gsa_model("mistral", gsa_full_attention_layers=[1], gsa_window=4)
    ids = torch.randint(3, 101, (1, 20))
    full = model(ids, use_cache=False).logits
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        by_new_name, _ = prefill_then_decode(model, ids, cut=9)
        generated = model.generate(ids[:, :9], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert rel_err(by_new_name, full) <= 1e-4
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, deprecations
    assert not [r.message for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert generated.shape == (1, 15)
    out = model(ids[:, :9], use_cache=True)
    cache, steps = output_cache(out), [out.logits]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer releases warn on the old name; it must still work
        for t in range(9, 20):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4
    with pytest.raises(ValueError, match="pass the cache once"):
        model(ids[:, :2], cache=GSACache(model.config), past_key_values=GSACache(model.config))


@pytest.mark.parametrize("rope", [False, True])
@torch.no_grad()
def test_left_padded_batch_matches_single_rows(rope):
    model = tiny_gsa_model("qwen2", gsa_use_rope=rope)
    prompts = [torch.randint(3, 101, (n,)) for n in (5, 17, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    kw = dict(max_new_tokens=15, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], do_sample=False, **kw)
        assert torch.equal(batched[i, width:], alone[0, len(p) :]), i
    # seeded sampling is reproducible
    torch.manual_seed(7)
    a = model.generate(ids, attention_mask=mask, do_sample=True, top_p=0.9, temperature=0.8, **kw)
    torch.manual_seed(7)
    b = model.generate(ids, attention_mask=mask, do_sample=True, top_p=0.9, temperature=0.8, **kw)
    assert torch.equal(a, b)


@torch.no_grad()
def test_padding_does_not_write_into_state():
    model = tiny_gsa_model("llama")
    p = torch.randint(3, 101, (1, 9))
    padded = torch.cat([torch.randint(3, 101, (1, 6)), p], dim=1)  # masked-out tokens with real embeddings
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    a = output_cache(model(p, use_cache=True))
    # position ids without a reset, so only the attention mask can keep the padding out of the memories
    b = output_cache(model(padded, attention_mask=mask, position_ids=torch.arange(15)[None], use_cache=True))
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert rel_err(lb.state[0], la.state[0]) <= 1e-6 and rel_err(lb.state[1], la.state[1]) <= 1e-6


@contextlib.contextmanager
def _layer_masks(model):
    """The masks the decoder layers get, in call order."""
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
        for layer in model.model.layers
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(
    "gsa", [dict(), dict(gsa_window=8), dict(gsa_full_attention_layers=[1]), dict(twins=True)], ids=str
)
@torch.no_grad()
def test_no_context_sized_mask_is_built_when_no_layer_reads_it(arch, gsa):
    """With a cache (prefill in chunks, decoding) the layers of an all-GSA model get an empty prepared mask, not
    transformers' [T, context] one, so peak memory does not grow with the context; a softmax layer still gets it,
    and so does a training twin while a hook calls it (calibration). Twins merely attached read nothing: a training
    forward then builds no mask (nor looks at packed position ids, which a graphed step could not)."""
    from t2r.train.teacher_attention import TransferCollector, attach_softmax_twins, calibration

    gsa = dict(gsa)
    twins = gsa.pop("twins", False)
    model = tiny_gsa_model(arch, **gsa)
    if twins:
        attach_softmax_twins(model)
    ids = torch.randint(3, 101, (2, 40))
    with _layer_masks(model) as seen:
        out = model(ids[:, :24], use_cache=True)
        second = model(ids[:, 24:], cache=output_cache(out), use_cache=True)
    masks = seen[len(model.model.layers) :]  # the second chunk, which has a past
    if gsa.get("gsa_full_attention_layers"):
        assert all(m is not None and m.numel() > 0 for m in masks)
    else:
        assert all(m is not None and m.numel() == 0 for m in masks)
    if twins:
        for hooked in (True, False):
            with (
                calibration(model, TransferCollector()) if hooked else contextlib.nullcontext(),
                _layer_masks(model) as seen,
            ):
                model(ids, use_cache=False)
            prepared_empty = [
                m is not None and m.numel() == 0 for m in seen
            ]  # the model's "no mask", else transformers'
            assert not any(prepared_empty) if hooked else all(prepared_empty)  # mask made while the hooks call twins
    full = model(ids, use_cache=False).logits
    assert rel_err(second.logits, full[:, 24:]) <= 1e-4


def test_a_training_step_on_the_kernels_waits_for_the_device_nowhere(monkeypatch):
    """A dense training batch through an all-GSA model on the Triton path reads nothing back from the device:
    transformers' look at the position ids for packed rows (which waited once per forward, and under CUDA-graph
    capture built a [T, T] mask no layer reads) is skipped, as in decoding. A kept softmax layer still gets its
    mask, and the loss is the same either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from t2r.kernels.tuning import TUNING

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero)
            return func(*args, **(kwargs or {}))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")  # the kernels (Triton's interpreter on the CPU)
    ids = torch.randint(3, 101, (2, 70), device=device)
    wide = dict(hidden_size=96, num_hidden_layers=2)  # heads of 16, the kernels' smallest
    model = tiny_gsa_model("llama", num_slots=16, teacher_overrides=wide).train().to(device)
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    with Reads() as reads:
        loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
        loss.backward()
    hook.remove()
    assert reads.count == 0
    assert seen[0] is not None and seen[0].numel() == 0  # the empty prepared mask
    kept = tiny_gsa_model("llama", num_slots=16, teacher_overrides=wide, gsa_full_attention_layers=[1])
    kept = kept.train().to(device)
    kept.load_state_dict(model.state_dict(), strict=False)
    seen.clear()
    hook = kept.model.layers[1].register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    with torch.no_grad():
        kept(input_ids=ids, use_cache=False)
    hook.remove()
    assert seen[0] is None or seen[0].numel() > 0  # built by transformers (None: SDPA's causal flag)


@torch.no_grad()
def test_cache_size_is_constant_in_context_length():
    model = tiny_gsa_model("mistral")
    sizes = []
    for n in (16, 512):
        cache = output_cache(model(torch.randint(3, 101, (2, n)), use_cache=True))
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0
    # and it is what the math says: per layer 2 x Hkv x M x head_dim fp32 values per row
    cfg = model.config
    assert sizes[0] == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 16 * cfg.head_dim * 4


@torch.no_grad()
def test_packed_rows_match_separate_documents():
    """Position-id resets mark document starts: each document sees only itself (fails if state leaked)."""
    model = tiny_gsa_model("llama", gsa_use_rope=True)
    docs = [torch.randint(3, 101, (n,)) for n in (7, 20, 13)]
    row = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = model(row, position_ids=pos, use_cache=False).logits
    offset = 0
    for d in docs:
        alone = model(d[None], use_cache=False).logits
        assert rel_err(packed[:, offset : offset + len(d)], alone) <= 1e-5
        offset += len(d)
    leaky = model(row, use_cache=False).logits  # no resets: later documents see earlier ones
    assert rel_err(leaky[:, 7:], packed[:, 7:]) > 1e-3


@torch.no_grad()
def test_packed_prefill_keeps_each_rows_last_document_state():
    model = tiny_gsa_model("llama")
    a, b = torch.randint(3, 101, (1, 8)), torch.randint(3, 101, (1, 12))
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    packed_cache = output_cache(model(row, position_ids=pos, use_cache=True))
    alone_cache = output_cache(model(b, use_cache=True))
    nxt = torch.randint(3, 101, (1, 1))
    x = model(nxt, cache=packed_cache, position_ids=torch.tensor([[12]])).logits
    y = model(nxt, cache=alone_cache, position_ids=torch.tensor([[12]])).logits
    assert rel_err(x, y) <= 1e-5


def test_foreign_cache_is_rejected():
    from transformers import DynamicCache

    model = tiny_gsa_model("llama")
    with pytest.raises(TypeError, match="GSACache"):
        model(torch.randint(3, 101, (1, 4)), cache=DynamicCache(), use_cache=True)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    model = tiny_gsa_model("qwen3", gsa_full_attention_layers=[0])
    ids = torch.randint(3, 101, (2, 30))
    before = model(ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "t2r_qwen3" and config["gsa_full_attention_layers"] == [0]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded(ids).logits, before)


REMOTE_LOAD = textwrap.dedent("""
    import json
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
        gen = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert not any(m == "t2r" or m.startswith("t2r.") for m in sys.modules)
    print(json.dumps({"cls": type(model).__module__, "gen": gen.tolist()}))
""")


@torch.no_grad()
def test_trust_remote_code_without_t2r(tmp_path):
    model = tiny_gsa_model("mistral", gsa_use_rope=True, gsa_full_attention_layers=[2])
    ids = torch.randint(3, 101, (2, 25))
    model.save_pretrained(tmp_path / "ckpt")
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("*.py"))
    kernels = {"dispatch.py", "reference.py", "chunk.py", "chunk_jit.py", "decode.py", "decode_jit.py", "tuning.py"}
    assert {"modeling_t2r.py", "configuration_t2r.py", "hf_compat.py", *kernels} <= set(saved)
    torch.save(ids, tmp_path / "ids.pt")
    proc = run_without_t2r(REMOTE_LOAD, [tmp_path / "ckpt", tmp_path / "ids.pt", tmp_path / "logits.pt"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cls"].startswith("transformers_modules")
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.equal(remote, model(ids).logits)
    local_gen = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert info["gen"] == local_gen.tolist()


def _hybrid(arch="mistral", window=16, **kw):
    model = tiny_gsa_model(arch, gsa_window=window, **kw)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.window_mix.weight.uniform_(-2, 2)  # heads with different window shares
            if layer.self_attn.window_mix.proj is not None:  # and tokens that lean differently
                layer.self_attn.window_mix.proj.weight.normal_(0, 0.5)
            if layer.self_attn.window_sink is not None:  # a sink that matters
                layer.self_attn.window_sink.key.normal_(0, 3.0)
                layer.self_attn.window_sink.value.normal_(0, 1.0)
    return model


@torch.no_grad()
def test_window_mix_hands_its_router_to_the_fused_step_only_as_a_plain_linear_map():
    """Decoding passes the per-token router's weight to the fused window step (its kernel makes the read); a router
    that is not a plain linear map (wrapped by peft, hooked, biased) gives its logits instead. Either way the
    reference step's logits are the module's."""
    import torch.nn.functional as F

    from t2r.models.modeling_t2r import WindowMix

    mix = WindowMix(4, 0.5, 8)
    mix.proj.weight.normal_()
    hidden = torch.randn(2, 1, 8)
    logits, proj, read_of = mix.terms(hidden)
    assert logits is mix.weight and proj is mix.proj.weight and read_of is hidden
    assert torch.allclose(logits.float() + F.linear(read_of, proj), mix(hidden), rtol=1e-6, atol=1e-6)
    pre = mix.proj.register_forward_pre_hook(lambda module, args: (args[0] * 2,))  # a pre-hook too
    assert torch.equal(mix.terms(hidden)[0], mix(hidden)) and mix.terms(hidden)[1:] == (None, None)
    pre.remove()
    mix.proj.register_forward_hook(lambda module, args, out: out * 2)
    assert torch.equal(mix.terms(hidden)[0], mix(hidden)) and mix.terms(hidden)[1:] == (None, None)
    biased = WindowMix(4, 0.5, 8)
    biased.proj = torch.nn.Linear(8, 4)
    assert biased.terms(hidden)[1] is None
    assert WindowMix(4, 0.5).terms(hidden)[1] is None  # per head only: nothing to read


HYBRIDS = pytest.mark.parametrize(
    "variant",
    [{}, {"gsa_window_mix_per_token": True}, {"gsa_window_sink": True}],
    ids=["mix-per-head", "mix-per-token", "sink"],
)


def test_hybrid_layers_share_one_forwards_window_masks(monkeypatch):
    """A forward's hybrid layers see the same positions, padding and documents: the first builds the window's
    block masks and the others reuse them (about ten launches per block and layer saved), with the loss and
    gradients of masks built by every layer; a new forward builds its own."""
    from t2r.models import window_attention

    model = _hybrid(window=4, gsa_window_sink=True).train()
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, 12)  # two documents per row
    built = []
    block_mask, swa = window_attention._block_mask, window_attention.sliding_window_attention
    monkeypatch.setattr(window_attention, "_block_mask", lambda *a: built.append(1) or block_mask(*a))
    results = []
    for share in (True, False):
        if not share:  # every layer builds its own masks
            monkeypatch.setattr("t2r.models.modeling_t2r.sliding_window_attention",
                                lambda *a, masks=None, **kw: swa(*a, **kw))  # fmt: skip
        model.zero_grad()
        built.clear()
        loss = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=ids).loss
        loss.backward()
        results.append(
            (built.copy(), loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    (shared, loss0, grads0), (own, loss1, grads1) = results
    assert len(shared) == 1 and len(own) == model.config.num_hidden_layers
    assert torch.equal(loss0, loss1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))


@torch.no_grad()
@HYBRIDS
def test_hybrid_decode_matches_full_forward_across_the_window(variant):
    """Prefill shorter than the window, then decode far past it: the carried window must match the
    parallel sliding-window attention at every step (the path Liger's GSA+SWA gets wrong)."""
    model = _hybrid(window=16, gsa_use_rope=True, **variant)
    ids = torch.randint(3, 101, (2, 70))
    full = model(ids, use_cache=False).logits
    for cut in (5, 16, 40):
        inc, cache = prefill_then_decode(model, ids, cut)
        assert rel_err(inc, full) <= 1e-4, cut
    ring_k, _, ring_valid, head = cache.layers[0].window
    window_bytes = ring_k.numel() * 4 * 2 + ring_valid.numel() + head.numel() * 8
    assert ring_k.shape == (2, 17, 2, 8)  # the sink's slot and the last 16 tokens
    assert head.tolist() == [1 + (70 - 40) % 16] * 2  # the last prefill (40 tokens) left it at 1
    assert cache.layers[0].nbytes() == window_bytes + sum(x.numel() * 4 for x in cache.layers[0].state)


@torch.no_grad()
@HYBRIDS
def test_a_chunk_after_decoding_steps_reads_the_ring_in_order(variant):
    """A multi-token forward on a cache whose ring the decoding steps have turned (its head past slot 1), as the next
    turn of a conversation is prefilled: the window sees the carried tokens in their order, then decoding goes on."""
    model = _hybrid(window=16, gsa_use_rope=True, **variant)
    ids = torch.randint(3, 101, (2, 60))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :20], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    step = lambda a, b: logits.append(model(ids[:, a:b], cache=cache, use_cache=True).logits)  # noqa: E731
    for t in range(20, 27):
        step(t, t + 1)
    assert cache.layers[0].window[3].tolist() == [8, 8]
    step(27, 45)
    for t in range(45, 60):
        step(t, t + 1)
    assert rel_err(torch.cat(logits, dim=1), full) <= 1e-4


@torch.no_grad()
def test_hybrid_window_attention_is_the_teachers_local_attention():
    """With the mix fully on the window and a window covering the sequence, a hybrid layer is the teacher."""
    from t2r.train.teacher_attention import as_teacher, attach_softmax_twins

    model = _hybrid(window=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.window_mix.weight.fill_(50.0)
    ids = torch.randint(3, 101, (2, 40))
    with as_teacher(attach_softmax_twins(model)):
        teacher = model(ids).logits
    assert rel_err(model(ids).logits, teacher) <= 1e-5


@torch.no_grad()
def test_hybrid_window_cache_size_is_constant():
    model = _hybrid(window=16)
    sizes = [output_cache(model(torch.randint(3, 101, (2, n)), use_cache=True)).nbytes() for n in (4, 16, 300)]
    assert sizes[0] == sizes[1] == sizes[2] > 0


@torch.no_grad()
@HYBRIDS
def test_hybrid_padding_and_packing_are_exact(variant):
    model = _hybrid(window=8, gsa_use_rope=True, **variant)
    prompts = [torch.randint(3, 101, (n,)) for n in (5, 13)]
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 13 - len(p) :], mask[i, 13 - len(p) :] = p, 1
    kw = dict(max_new_tokens=20, pad_token_id=0, eos_token_id=None, do_sample=False)
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i, 13:], model.generate(p[None], **kw)[0, len(p) :]), i
    docs = [torch.randint(3, 101, (n,)) for n in (11, 20)]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = model(torch.cat(docs)[None], position_ids=pos).logits
    assert rel_err(packed[:, 11:], model(docs[1][None]).logits) <= 1e-5


@torch.no_grad()
def test_window_sink_is_a_first_token_seen_from_everywhere():
    """Windowed attention over tokens 1.. with token 0 as the sink equals attention over the window plus token 0
    (an explicit mask), for queries inside and far beyond the window."""
    from t2r.models.window_attention import sliding_window_attention

    B, T, H, Hkv, D, W = 2, 40, 4, 2, 8, 6
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    k[1, 0], v[1, 0] = k[0, 0], v[0, 0]  # the sink is one token, shared by the batch
    t = torch.arange(T)
    allowed = ((t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - W)) | (t[None, :] == 0)
    scores = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(H // Hkv, 2)) * 0.3
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = torch.einsum("bhtj,bjhd->bthd", weights, v.repeat_interleave(H // Hkv, 2))[:, 1:]
    out, _ = sliding_window_attention(q[:, 1:], k[:, 1:], v[:, 1:], W, 0.3, sink=(k[0, 0], v[0, 0]), block=7)
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("sink", [False, True])
def test_window_decoding_step_is_attention_over_the_carried_window(sink):
    """One new token on top of a carried ring (decoding's path, without the block loop; the model's hybrid decoding
    tests check it against the parallel forward): masked softmax attention over the sink, the last W - 1 tokens'
    real slots and itself (a padding query too); the ring then holds the last W tokens, the new one over the
    oldest, whatever slot each row's head was at."""
    from t2r.kernels.reference import window_in_order, window_ring, window_step_attention

    B, H, Hkv, D, W = 3, 4, 2, 8, 6
    tokens = (torch.randn(B, W + 3, Hkv, D), torch.randn(B, W + 3, Hkv, D), torch.ones(B, W + 3, dtype=torch.bool))
    tokens[2][1, : W + 1] = False  # a left-padded row
    sk = (torch.randn(Hkv, D), torch.randn(Hkv, D)) if sink else None
    ring = window_ring(*(x[:, :W] for x in tokens), W, sk)  # head 1: in order
    for t in range(W, W + 3):  # move each row's head on (the steps' outputs are checked below, from here)
        window_step_attention(torch.randn(B, 1, H, D), tokens[0][:, t : t + 1], tokens[1][:, t : t + 1], 0.3,
                              tokens[2][:, t : t + 1], ring)  # fmt: skip
    assert ring[3].tolist() == [4] * B
    in_order = window_in_order(ring)
    for got, want in zip(in_order, (x[:, 3:] for x in tokens), strict=True):
        assert torch.equal(got, want)
    q, k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, Hkv, D), torch.randn(B, 1, Hkv, D)
    valid = torch.tensor([[True], [True], [False]])
    out = window_step_attention(q, k, v, 0.3, valid, ring)
    keys, values = torch.cat([in_order[0][:, 1:], k], 1), torch.cat([in_order[1][:, 1:], v], 1)
    allowed = torch.cat([in_order[2][:, 1:], torch.ones(B, 1, dtype=torch.bool)], 1)
    if sink:
        keys = torch.cat([sk[0].expand(B, 1, Hkv, D), keys], 1)
        values = torch.cat([sk[1].expand(B, 1, Hkv, D), values], 1)
        allowed = torch.cat([torch.ones(B, 1, dtype=torch.bool), allowed], 1)
    scores = torch.einsum("bthd,bjhd->bhtj", q, keys.repeat_interleave(H // Hkv, 2)) * 0.3
    weights = scores.masked_fill(~allowed[:, None, None], float("-inf")).softmax(-1)
    expected = torch.einsum("bhtj,bjhd->bthd", weights, values.repeat_interleave(H // Hkv, 2))
    assert rel_err(out, expected) <= 1e-5
    after = window_in_order(ring)
    assert torch.equal(after[0], torch.cat([in_order[0][:, 1:], k], 1))
    assert torch.equal(after[1], torch.cat([in_order[1][:, 1:], v], 1))
    assert torch.equal(after[2], torch.cat([in_order[2][:, 1:], valid], 1))
    assert torch.equal(ring[2][:, 0], torch.full((B,), sink)) and ring[3].tolist() == [5] * B


def test_inference_model_carries_no_training_machinery(tmp_path):
    """The model (and the code saved beside a checkpoint) is inference only; training attaches the teacher's
    attention from outside without adding parameters, buffers or modules to the model."""
    from t2r.train.teacher_attention import as_teacher, attach_softmax_twins

    model = tiny_gsa_model("qwen3", gsa_window=4)
    names = list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    attach_softmax_twins(model)
    assert list(model.state_dict()) == names and [n for n, _ in model.named_modules()] == modules
    with as_teacher(model):
        assert not [m for m in model.modules() if isinstance(m, GSAAttention)]
    assert all(isinstance(layer.self_attn, GSAAttention) for layer in model.model.layers)
    model.save_pretrained(tmp_path)
    code = "\n".join(p.read_text() for p in tmp_path.glob("*.py"))
    for word in ("transfer", "calibrat", "collector", "teacher_forward", "TeacherForced", "self.mode ="):
        assert word not in code, word
