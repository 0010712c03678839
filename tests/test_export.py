"""t2r export and t2r generate: merged and adapter exports, the parity gate, remote-code loading, decoding."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from conftest import rel_err, run_without_t2r
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from t2r.errors import T2RError
from t2r.export.exporter import export
from t2r.generate import generate, load_for_generation
from t2r.models.hf_compat import output_cache
from t2r.models.loading import load_converted
from t2r.train.run_record import read_run, rebuild_model


def _tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@torch.no_grad()
def test_merged_export_equals_base_plus_lora(tiny_run, tmp_path):
    dest = export(tiny_run, tmp_path / "exp", dtype="fp32")
    record = json.loads((dest / "export.json").read_text())
    assert record["kind"] == "merged" and record["parity_checked"] and record["parity_gap"] < 1e-4
    exported = _tensors(dest)
    run = read_run(tiny_run)
    after_stage1 = rebuild_model(tiny_run, upto=1).state_dict()
    adapter_dir = tiny_run / run.stages_done[1].output
    adapter = _tensors(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    checked = 0
    for name, base in after_stage1.items():
        key = "base_model.model." + name.replace(".weight", "")
        a, b = adapter.get(f"{key}.lora_A.weight"), adapter.get(f"{key}.lora_B.weight")
        if a is not None:
            assert rel_err(exported[name], base + scale * b @ a) <= 1e-6, name
            assert not torch.equal(exported[name], base)
            checked += 1
    assert checked == 2 * 3  # q_proj and v_proj of three layers
    card = (dest / "README.md").read_text()
    assert "passed: relative gap" in card and "| lm | lora |" in card


REMOTE = textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
""")


@torch.no_grad()
def test_export_loads_without_t2r_and_matches(tiny_run, tmp_path):
    dest = export(tiny_run, tmp_path / "exp", dtype="fp32")
    ids = torch.randint(3, 100, (2, 30))
    torch.save(ids, tmp_path / "ids.pt")
    proc = run_without_t2r(REMOTE, [dest, tmp_path / "ids.pt", tmp_path / "out.pt"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = rebuild_model(tiny_run).eval()(ids).logits
    assert rel_err(torch.load(tmp_path / "out.pt", weights_only=True), before) <= 1e-6


@torch.no_grad()
def test_adapter_only_export(tiny_run, tmp_path):
    from peft import PeftModel

    dest = export(tiny_run, tmp_path / "adapter", adapter_only=True)
    assert (dest / "adapter_config.json").is_file() and not list(dest.glob("model*.safetensors"))
    model = PeftModel.from_pretrained(load_converted(read_run(tiny_run).model_dir), str(dest)).eval()
    ids = torch.randint(3, 100, (1, 20))
    assert rel_err(model(ids).logits, rebuild_model(tiny_run).eval()(ids).logits) <= 1e-6


def test_parity_check_catches_broken_decoding(tiny_run, tmp_path, monkeypatch):
    from t2r.models.cache_t2r import GSAStateLayer

    original = GSAStateLayer.update_state

    def forgetful(self, state, new_tokens, window=None):  # decoding that drops the memories it was given
        original(self, tuple(torch.zeros_like(x) for x in state) if self.seen_tokens else state, new_tokens, window)

    monkeypatch.setattr(GSAStateLayer, "update_state", forgetful)
    with pytest.raises(T2RError, match="parity check failed"):
        export(tiny_run, tmp_path / "exp", dtype="fp32")
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp*"))
    skipped = export(tiny_run, tmp_path / "skipped", dtype="fp32", skip_check=True)
    assert "**skipped**" in (skipped / "README.md").read_text()


def test_export_bad_inputs(tiny_run, tiny_converted, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(T2RError, match="already exists"):
        export(tiny_run, tmp_path / "taken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T2RError, match="has no checkpoint"):
        export(tmp_path / "empty", tmp_path / "x")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_converted, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(T2RError, match="cannot load"):
        export(broken, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@torch.no_grad()
def test_fla_format_renames_tensors_bit_for_bit(tiny_run, tmp_path):
    dest = export(tiny_run, tmp_path / "exp", dtype="fp32", fmt="fla")
    ours, fla = _tensors(dest), _tensors(dest / "fla")
    assert len(fla) == len(ours)
    expected = {
        "model.embeddings.weight": "model.embed_tokens.weight",
        "model.layers.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
        "model.layers.1.mlp_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.attn.f_proj.weight": "model.layers.1.self_attn.f_proj.weight",
        "model.layers.1.attn.g_norm.weight": "model.layers.1.self_attn.g_norm.weight",
        "model.layers.1.attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.gate_proj.weight": "model.layers.1.mlp.gate_proj.weight",
        "model.norm.weight": "model.norm.weight",
    }
    for fla_key, our_key in expected.items():
        assert torch.equal(fla[fla_key], ours[our_key]), fla_key
    assert not [k for k in fla if "self_attn" in k or "layernorm" in k or "embed_tokens" in k]
    config = json.loads((dest / "fla" / "config.json").read_text())
    model = read_run(tiny_run)
    assert config["model_type"] == "gsa" and config["num_slots"] == 16 and config["num_kv_heads"] == 6
    assert config["gate_logit_normalizer"] == 8.0 and config["feature_map"] == "swish"
    assert config["hidden_size"] == 48 and config["num_heads"] == 6 and model.stages_done
    assert (dest / "fla" / "tokenizer.json").is_file()
    assert json.loads((dest / "export.json").read_text())["fla"]["tensors"] == len(fla)


def test_fla_format_refuses_what_fla_cannot_express(tiny_converted, tmp_path):
    from t2r.convert import ConvertOptions, convert

    teacher = json.loads((tiny_converted / "conversion.json").read_text())["source"]["path"]
    roped = convert(teacher, tmp_path / "roped", ConvertOptions(num_slots=16, use_rope=True, window=4), progress=False)
    with pytest.raises(T2RError, match=r"cannot load in FLA's GSA: RoPE on q/k .*; hybrid window"):
        export(roped, tmp_path / "x", fmt="fla")
    assert not (tmp_path / "x").exists()
    with pytest.raises(T2RError, match="--format must be"):
        export(roped, tmp_path / "x", fmt="onnx")
    biased = convert(teacher, tmp_path / "biased", ConvertOptions(num_slots=16, gate_half_life_max=512), progress=False)
    with pytest.raises(T2RError, match=r"cannot load in FLA's GSA: a gate bias \(FLA's f_proj has none\)"):
        export(biased, tmp_path / "x", fmt="fla")


def test_generate_greedy_sampling_and_padding(tiny_run):
    model, tok = load_for_generation(tiny_run, device="cpu")
    prompts = ["The with statement", "A", "Exceptions are raised when"]
    greedy = generate(model, tok, prompts, max_new_tokens=12)
    assert greedy == generate(model, tok, prompts, max_new_tokens=12)
    for p, text in zip(prompts, greedy, strict=True):  # left-padded rows equal single-row runs
        assert generate(model, tok, [p], max_new_tokens=12) == [text]
    a = generate(model, tok, prompts, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    b = generate(model, tok, prompts, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    assert a == b


@torch.no_grad()
def test_generation_cache_stays_constant(tiny_converted):
    model = AutoModelForCausalLM.from_pretrained(tiny_converted).eval()
    ids = torch.randint(3, 100, (1, 8))
    sizes = []
    for n in (16, 1024):
        out = model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True, pad_token_id=0
        )
        assert out.sequences.shape[1] == 8 + n
        sizes.append(output_cache(out).nbytes())
    assert sizes[0] == sizes[1] > 0


def test_cli_generate_and_export(tiny_run, tmp_path, capsys):
    from t2r.cli import main

    for args in (
        ["export", str(tiny_run), str(tmp_path / "e"), "--dtype", "fp32"],
        ["generate", str(tmp_path / "e"), "--prompt", "Hello", "--max-new-tokens", "5"],
    ):
        sys.argv = ["t2r", *args]
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("exported ") and "\nHello" in out  # the prompt, then its continuation
