"""t2r eval: perplexity and passkey retrieval, reproducible, with the teacher beside the student."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from t2r.eval.evaluate import evaluate, passkey_accuracy, passkey_prompts, position_buckets


def test_eval_tiny_model_is_finite_and_reproducible(tiny_converted, corpus_files):
    kw = dict(windows=(64, 128), max_windows=4, contexts=(128,), trials=4, device="cpu")
    a = evaluate(tiny_converted, corpus_files, **kw)
    b = evaluate(tiny_converted, corpus_files, **kw)
    assert a == b
    for name in ("student", "teacher"):
        assert [r["window"] for r in a["ppl"][name]] == [64, 128]
        assert all(1 < r["ppl"] < 1e6 for r in a["ppl"][name])
        assert 0 <= a["passkey"][name][0]["accuracy"] <= 1
    assert a["ppl"]["student"][0]["tokens"] == 4 * 63
    # The by-position split partitions the scored tokens: its token-weighted log-mean is the overall NLL.
    for row in a["ppl"]["student"]:
        spans = position_buckets(row["window"])
        assert list(row["ppl_by_position"]) == [f"{lo}-{hi}" for lo, hi in spans]
        mixed = sum((hi - lo) * math.log(row["ppl_by_position"][f"{lo}-{hi}"]) for lo, hi in spans)
        assert abs(mixed / (row["window"] - 1) - row["nll"]) < 1e-3


def test_position_buckets_cover_every_target_once():
    assert position_buckets(128) == [(0, 64), (64, 127)]
    spans = position_buckets(4096)
    assert spans[0] == (0, 64) and spans[-1] == (2048, 4095)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize(
    ("option", "expect"),
    [
        (["--window", "1"], "--window must be at least 2 tokens"),
        (["--context", "64"], "--context must be at least 128 tokens"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--max-windows", "0"], "--max-windows must be at least 1"),
        (["--batch", "0"], "--batch must be at least 1"),
    ],
)
def test_bad_options_one_line_errors(tiny_converted, corpus_files, tmp_path, capsys, option, expect):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_converted), "--data", corpus_files[0], "--device", "cpu", "--json", str(out), *option]
    code, lines = run_cli(args, capsys)
    assert code == 1 and lines[-1].startswith("t2r: error: ") and expect in lines[-1], lines
    assert not out.exists()


def test_options_of_a_skipped_part_are_not_checked(tiny_converted, corpus_files, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_converted), "--data", corpus_files[0], "--device", "cpu", "--json", str(out)]
    code, _ = run_cli([*args, "--no-passkey", "--context", "64", "--window", "64", "--max-windows", "2"], capsys)
    assert code in (0, None) and json.loads(out.read_text())["passkey"] == {}


def test_passkey_prompts_are_deterministic_per_seed(tiny_converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_converted)
    a, b = passkey_prompts(tok, 1024, 20, seed=1), passkey_prompts(tok, 1024, 20, seed=1)
    c = passkey_prompts(tok, 1024, 20, seed=2)
    assert a == b and [k for _, k, _ in a] != [k for _, k, _ in c]
    assert all(len(k) == 5 and k.isdigit() and f"The pass key is {k}." in p for p, k, _ in a)
    depths = [d for _, _, d in a]
    assert depths == sorted(depths) and depths[0] < 0.1 and depths[-1] > 0.9
    lengths = [len(tok(p).input_ids) for p, _, _ in a]
    assert all(0.85 * 1024 <= n <= 1024 for n in lengths), lengths


@pytest.mark.slow
def test_teacher_smollm2_retrieves_passkeys():
    """The task is solvable: SmolLM2-135M-Instruct (the teacher) finds the key in short contexts on CPU."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2r.convert.sources import resolve_source

    src = resolve_source("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(src.path).eval()
    tok = AutoTokenizer.from_pretrained(src.path)
    result = passkey_accuracy(model, tok, context=256, trials=6, batch=6)
    assert result["accuracy"] >= 5 / 6, result
    assert [x["key"] for x in result["samples"]] == [key for _, key, _ in passkey_prompts(tok, 256, 6)]
    assert sum(x["key"] in x["answer"] for x in result["samples"]) >= 5
    assert json.loads(json.dumps(result)) == result and Path(src.path).is_dir()
