"""t2r convert: streamed conversion of tiny sharded teachers of each architecture, options and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import rel_err, run_cli, teacher_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from t2r.convert import ConvertOptions, convert
from t2r.convert.gates import init_gate
from t2r.errors import T2RError
from t2r.models.hf_compat import output_cache
from t2r.models.modeling_t2r import GSAAttention


def make_teacher(tmp_path: Path, arch: str, **overrides) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = teacher_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path / f"teacher-{arch}"
    model.save_pretrained(path, max_shard_size="60KB")  # several shards, like a hub checkpoint
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    return path, model


def load_all(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


@pytest.mark.parametrize("gate_init", ["random", "kproj"])
def test_convert_tiny_teacher(tmp_path, arch, gate_init):
    src, teacher = make_teacher(tmp_path, arch)
    assert len(list(src.glob("*.safetensors"))) > 2
    out = convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, gate_init=gate_init), progress=False)
    before, after = load_all(src), load_all(out)
    for name, t in before.items():  # every teacher tensor, bit for bit
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    cfg = teacher.config
    new = set(after) - set(before)
    assert len(new) == 2 * cfg.num_hidden_layers
    for i in range(cfg.num_hidden_layers):
        assert after[f"model.layers.{i}.self_attn.f_proj.weight"].shape == (cfg.num_key_value_heads * 8, 48)
        norm = after[f"model.layers.{i}.self_attn.g_norm.weight"]
        assert torch.equal(norm, torch.ones(6 * (getattr(cfg, "head_dim", None) or 8)))
    record = json.loads((out / "conversion.json").read_text())
    assert record["tensors_reused"] == len(before) and record["tensors_new"] == len(new)
    assert record["params_new"] == sum(after[n].numel() for n in new)
    assert (out / "README.md").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "modeling_t2r.py").is_file() and (out / "reference.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(isinstance(layer.self_attn, GSAAttention) for layer in model.model.layers)
    with torch.no_grad():
        logits = model(torch.randint(3, 101, (2, 40))).logits
    assert torch.isfinite(logits).all()


def test_kproj_gate_init_pools_key_rows():
    config = type("C", (), dict(num_key_value_heads=2, gsa_num_slots=4, hidden_size=5, initializer_range=0.02))
    k = torch.randn(2 * 8, 5)  # head_dim 8 -> 4 slots: mean of row pairs
    gate = init_gate(config, 0, k, "kproj", 0)
    expect = k.reshape(2, 4, 2, 5).mean(2).reshape(8, 5)
    assert rel_err(gate, expect) <= 1e-6
    config.gsa_num_slots = 8  # head_dim == slots: the key rows themselves
    assert torch.equal(init_gate(config, 0, k, "kproj", 0), k)
    config.gsa_num_slots = 16  # more slots than key dims: rows repeated
    assert torch.equal(init_gate(config, 0, k, "kproj", 0), k.reshape(2, 8, 1, 5).repeat(1, 1, 2, 1).reshape(32, 5))
    r1, r2 = init_gate(config, 3, None, "random", 0), init_gate(config, 3, None, "random", 0)
    assert torch.equal(r1, r2) and abs(r1.std().item() - 0.02) < 0.005


@torch.no_grad()
def test_full_attention_layers_reproduce_teacher(tmp_path):
    src, teacher = make_teacher(tmp_path, "mistral")
    out = convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, full_attention_layers=[0, 2]), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["MistralAttention", "GSAAttention", "MistralAttention"]
    captured = {}

    def keep(name):
        return lambda mod, args, kwargs, output: captured.__setitem__(name, output[0])

    teacher.model.layers[0].self_attn.register_forward_hook(keep("teacher"), with_kwargs=True)
    model.model.layers[0].self_attn.register_forward_hook(keep("student"), with_kwargs=True)
    ids = torch.randint(3, 101, (2, 33))
    teacher(ids)
    model(ids)
    assert torch.equal(captured["teacher"], captured["student"])
    every = convert(str(src), tmp_path / "all", ConvertOptions(full_attention_layers=[0, 1, 2]), progress=False)
    same = AutoModelForCausalLM.from_pretrained(every).eval()
    assert torch.equal(same(ids).logits, teacher(ids).logits)


def test_dtype_option_casts_everything(tmp_path):
    src, _ = make_teacher(tmp_path, "llama")
    out = convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, dtype="bf16"), progress=False)
    tensors = load_all(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_output_is_resharded_with_index(tmp_path):
    src, _ = make_teacher(tmp_path, "qwen2")
    out = convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, max_shard_size="100KB"), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_all(out).values())


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src, _ = make_teacher(tmp_path, "llama")
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return init_gate(*args, **kwargs)

    monkeypatch.setattr("t2r.convert.converter.init_gate", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8), progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def assert_one_line_error(code, lines, pattern):
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("t2r: error: "), lines
    assert pattern in lines[0], lines[0]


def test_cli_convert_runs(tmp_path, capsys):
    src, _ = make_teacher(tmp_path, "qwen3")
    code, lines = run_cli(
        [
            "convert",
            str(src),
            str(tmp_path / "out"),
            "--num-slots",
            "8",
            "--rope",
            "--full-attention-layers",
            "1",
            "--gate-init",
            "random",
        ],
        capsys,
    )
    assert code == 0, lines
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["gsa_use_rope"] is True and config["gsa_full_attention_layers"] == [1]
    assert config["model_type"] == "t2r_qwen3"


@pytest.mark.parametrize(
    "case",
    ["missing", "alias", "arch", "slots", "exists", "truncated", "layers", "hub", "half-life", "auto-n", "auto-all"],
)
def test_cli_bad_inputs(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    if case in ("arch", "slots", "exists", "truncated", "layers", "half-life", "auto-n", "auto-all"):
        src, _ = make_teacher(tmp_path, "llama")
    args, expect = {
        "missing": (["./no/such/model", str(out)], "not found"),
        "alias": (["llama-9000", str(out)], "unknown model alias 'llama-9000'"),
        "arch": None,
        "slots": (["SRC", str(out), "--num-slots", "0"], "--num-slots must be >= 1 and <= 1024, got 0"),
        "exists": (["SRC", str(out)], "already exists"),
        "truncated": None,
        "layers": (["SRC", str(out), "--full-attention-layers", "1,7"], "out of range"),
        "hub": (["someone/some-model", str(out)], "not in the local Hugging Face cache"),
        "half-life": (["SRC", str(out), "--gate-half-life-max", "4"], "above the unbiased half-life of 8 tokens"),
        "auto-n": (["SRC", str(out), "--full-attention-layers", "auto:x"], "auto:N needs a positive integer N"),
        "auto-all": (["SRC", str(out), "--full-attention-layers", "auto:3"], "would keep every layer: the model has 3"),
    }[case] or (None, None)
    if case == "arch":
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (src / "config.json").write_text(json.dumps(cfg))
        args, expect = ["SRC", str(out)], "unsupported architecture 'gpt2' (GPT2LMHeadModel)"
    if case == "truncated":
        shard = sorted(src.glob("model-*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:-100])
        args, expect = ["SRC", str(out)], f"corrupt or truncated shard {shard.name}"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    args = [str(src) if a == "SRC" else a for a in args]
    code, lines = run_cli(["convert", *args], capsys)
    assert_one_line_error(code, lines, expect)
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.slow
def test_convert_real_smollm2_from_gguf(tmp_path):
    pytest.importorskip("gguf")
    out = convert("smollm2-135m", tmp_path / "smollm2", ConvertOptions(), progress=False)
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"]["kind"] == "gguf" and record["teacher_model_type"] == "llama"
    teacher_dir = Path(record["source"]["path"])
    before, after = load_all(teacher_dir), load_all(out)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert record["params_new"] == 30 * (3 * 64 * 576 + 576)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 49152, (1, 64))).logits
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.json").is_file()
    # kproj gates of layer 0: head_dim 64 == slots 64, so f_proj is k_proj itself
    gate, key = after["model.layers.0.self_attn.f_proj.weight"], before["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(gate, key)


@torch.no_grad()
def test_convert_hybrid_window(tmp_path):
    src, _ = make_teacher(tmp_path, "llama")  # no tokenizer: the default window sink cannot be chosen
    with pytest.raises(T2RError, match=r"needs the teacher's tokenizer .*--no-window-sink converts the hybrid"):
        convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, window=16), progress=False)
    assert not (tmp_path / "out").exists()
    options = ConvertOptions(num_slots=8, window=16, window_mix_init=1.5, window_sink=False)
    out = convert(str(src), tmp_path / "out", options, progress=False)
    tensors = load_all(out)
    mix = tensors["model.layers.1.self_attn.window_mix.weight"]
    assert torch.equal(mix, torch.full((6,), 1.5))
    config = json.loads((out / "config.json").read_text())
    assert config["gsa_window"] == 16 and json.loads((out / "conversion.json").read_text())["options"]["window"] == 16
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 101, (1, 50))
    full = model(ids).logits
    out1 = model(ids[:, :20], use_cache=True)
    steps = [out1.logits]
    for t in range(20, 50):
        steps.append(model(ids[:, t : t + 1], cache=output_cache(out1)).logits)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4


@torch.no_grad()
def test_convert_hybrid_with_per_token_window_share(tmp_path):
    """The router starts at zero: the converted model is the per-head hybrid exactly, with one more tensor."""
    src, _ = make_teacher(tmp_path, "llama")
    plain = convert(
        str(src), tmp_path / "plain", ConvertOptions(num_slots=8, window=16, window_sink=False), progress=False
    )
    options = ConvertOptions(num_slots=8, window=16, window_mix_per_token=True, window_sink=False)
    out = convert(str(src), tmp_path / "out", options, progress=False)
    extra = set(load_all(out)) - set(load_all(plain))
    assert extra == {f"model.layers.{i}.self_attn.window_mix.proj.weight" for i in range(3)}
    router = load_all(out)["model.layers.0.self_attn.window_mix.proj.weight"]
    assert router.shape == (6, 48) and not router.any()
    ids = torch.randint(3, 101, (2, 30))
    a, b = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (plain, out))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert json.loads((out / "config.json").read_text())["gsa_window_mix_per_token"] is True
    with pytest.raises(T2RError, match="--window-mix-per-token needs a hybrid"):
        convert(str(src), tmp_path / "bad", ConvertOptions(num_slots=8, window_mix_per_token=True), progress=False)
    assert not (tmp_path / "bad").exists()


@torch.no_grad()
def test_convert_hybrid_with_window_sink(tmp_path):
    """The sink of each layer (on by default for hybrids) is the teacher's own key (after RoPE) and value of a
    newline at position 0: what its KV cache holds after that one token."""
    from transformers import AutoTokenizer

    from t2r.convert.window_sink import sink_token

    src, _ = make_teacher(tmp_path, "qwen3")  # q/k norms: the sink key must pass through them too
    out = convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, window=16), progress=False)
    tensors = load_all(out)
    record = json.loads((out / "conversion.json").read_text())
    token = sink_token(AutoTokenizer.from_pretrained(src))
    assert record["window_sink_token"] == token and "window sink token" in (out / "README.md").read_text()
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    cache = output_cache(teacher(torch.tensor([[token]]), use_cache=True))
    for i in range(3):
        key, value = (
            tensors[f"model.layers.{i}.self_attn.window_sink.key"],
            tensors[f"model.layers.{i}.self_attn.window_sink.value"],
        )
        assert (
            rel_err(key, cache.layers[i].keys[0, :, 0]) <= 1e-5
            and rel_err(value, cache.layers[i].values[0, :, 0]) <= 1e-5
        )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        model.model.layers[0].self_attn.window_sink is not None
        and torch.isfinite(model(torch.randint(3, 101, (1, 40))).logits).all()
    )
    with pytest.raises(T2RError, match="--window-sink needs a hybrid"):
        convert(str(src), tmp_path / "bad", ConvertOptions(num_slots=8, window_sink=True), progress=False)
    assert not (tmp_path / "bad").exists()


@torch.no_grad()
def test_window_sink_streamed_equals_the_teachers_kv_cache(tmp_path, arch):
    """The layer-by-layer sink pass of every supported architecture gives what the whole teacher caches after the
    token (so nothing a layer needs is lost by building it from the shards alone)."""
    from t2r.convert.window_sink import sink_key_values

    src, teacher = make_teacher(tmp_path, arch)
    sink = sink_key_values(src, 7, [0, 2])
    cache = output_cache(teacher(torch.tensor([[7]]), use_cache=True))
    assert sorted(sink) == [0, 2]
    for i in (0, 2):
        assert rel_err(sink[i][0], cache.layers[i].keys[0, :, 0]) <= 1e-5
        assert rel_err(sink[i][1], cache.layers[i].values[0, :, 0]) <= 1e-5


def test_cli_window_sink(tmp_path, capsys):
    src, _ = make_teacher(tmp_path / "q", "qwen3")
    args = ["convert", str(src), str(tmp_path / "out"), "--num-slots", "8", "--window", "16", "--window-sink"]
    code, lines = run_cli(args, capsys)
    assert code == 0, lines
    assert json.loads((tmp_path / "out" / "config.json").read_text())["gsa_window_sink"] is True
    for flag, expected in (([], True), (["--no-window-sink"], False)):  # on by default for hybrids
        code, lines = run_cli([*args[:-1], *flag, "--force"], capsys)
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert code == 0 and config["gsa_window_sink"] is expected, (flag, lines)
    code, lines = run_cli(["convert", str(src), str(tmp_path / "bad"), "--window-sink"], capsys)
    assert_one_line_error(code, lines, "--window-sink needs a hybrid")
    no_tokenizer, _ = make_teacher(tmp_path / "l", "llama")  # its tokenizer_config.json names no tokenizer
    code, lines = run_cli([*args[:1], str(no_tokenizer), str(tmp_path / "bad"), *args[3:]], capsys)
    assert_one_line_error(code, lines, "--window-sink needs the teacher's tokenizer")
    assert not (tmp_path / "bad").exists()


@torch.no_grad()
def test_gate_bias_spreads_memory_half_lives(tmp_path):
    from t2r.train.recipe import Stage
    from t2r.train.trainable import configure_trainable

    src, _ = make_teacher(tmp_path, "llama")
    plain = load_all(convert(str(src), tmp_path / "plain", ConvertOptions(num_slots=8), progress=False))
    out = convert(str(src), tmp_path / "out", ConvertOptions(num_slots=8, gate_half_life_max=2048), progress=False)
    tensors = load_all(out)
    assert set(tensors) - set(plain) == {f"model.layers.{i}.self_attn.f_proj.bias" for i in range(3)}
    assert all(torch.equal(tensors[k], v) for k, v in plain.items())  # the weights do not depend on the bias
    bias = tensors["model.layers.0.self_attn.f_proj.bias"].double().view(-1, 8)  # [KV heads, slots]
    half_life = math.log(2) / (-torch.nn.functional.logsigmoid(bias) / 8.0)  # tokens, at zero gate input
    expect = torch.logspace(math.log10(8), math.log10(2048), 8, dtype=torch.float64)
    assert rel_err(half_life[0], expect) <= 1e-5 and len(bias) > 1 and (bias == bias[0]).all()
    assert json.loads((out / "config.json").read_text())["gsa_gate_bias"] is True
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(model.model.layers[2].self_attn.f_proj.bias, tensors["model.layers.2.self_attn.f_proj.bias"])
    ids = torch.randint(3, 101, (1, 40))
    full = model(ids).logits
    first = model(ids[:, :25], use_cache=True)
    steps = [first.logits] + [model(ids[:, t : t + 1], cache=output_cache(first)).logits for t in range(25, 40)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4
    trainable = configure_trainable(model, Stage(train="new"), 0)[0]
    assert {n for n, p in trainable.named_parameters() if p.requires_grad and "f_proj" in n} == {
        f"model.layers.{i}.self_attn.f_proj.{w}" for i in range(3) for w in ("weight", "bias")
    }
