"""t2r eval: perplexity and passkey retrieval, reproducible, with the teacher beside the student."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from t2r.eval.options import EvalOptions
from t2r.eval.passkey import passkey_accuracy
from t2r.eval.perplexity import position_buckets
from t2r.eval.runner import evaluate
from t2r.prompts import passkey_prompts


def test_eval_tiny_model_is_finite_and_reproducible(tiny_converted, corpus_files):
    kw = dict(data=corpus_files, windows=[64, 128], max_windows=4, contexts=[128], trials=4, device="cpu")
    a = evaluate(tiny_converted, EvalOptions(**kw))
    b = evaluate(tiny_converted, EvalOptions(**kw))
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
        (["--window", "1"], "--window must be >= 2 and <= 1048576, got [1]"),
        (["--context", "64"], "--context must be >= 128 and <= 1048576, got [64]"),
        (["--trials", "0"], "--trials must be >= 1 and <= 100000, got 0"),
        (["--max-windows", "0"], "--max-windows must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1 and <= 4096, got 0"),
        (["--tasks", "piqa,squad"], "--tasks must be one of lambada, piqa"),
        (["--limit", "0"], "--limit must be >= 1"),
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


def test_zero_shot_tasks_beside_the_teacher_from_the_command_line(tiny_converted, tmp_path, capsys):
    """t2r eval --tasks: every task's metrics for student and teacher, the recovery table, JSON and the plot."""
    import lzma

    data = tmp_path / "eval"
    data.mkdir()
    piqa = [{"goal": f"To do thing {i}", "sol1": "use a cup", "sol2": "use a hat", "label": i % 2} for i in range(6)]
    with lzma.open(data / "piqa_valid.jsonl.xz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in piqa))
    text = "The cat sat on the mat and looked at the dog"
    with lzma.open(data / "lambada_openai_test.jsonl.xz", "wt") as f:
        f.write("".join(json.dumps({"text": text + f" number{i}"}) + "\n" for i in range(4)))
    out, png = tmp_path / "r.json", tmp_path / "recovery.png"
    args = ["eval", str(tiny_converted), "--tasks", "piqa,lambada", "--data-dir", str(data), "--no-passkey"]
    code, _ = run_cli([*args, "--device", "cpu", "--json", str(out), "--plot", str(png)], capsys)
    assert code in (0, None)
    result = json.loads(out.read_text())["zeroshot"]
    assert list(result["tasks"]) == ["piqa", "lambada"]
    for task in ("piqa", "lambada"):
        assert set(result["tasks"][task]["scores"]) == {"student", "teacher"}
    assert result["tasks"]["piqa"]["scores"]["student"]["n"] == 6
    assert "recovery" in result and png.stat().st_size > 1000
