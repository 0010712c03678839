"""Reliability: every bad input is one line on stderr with a non-zero exit and nothing half-written; a run killed
at any transition resumes to the uninterrupted result; --force deletes only what t2r wrote; paths read from model
and run files stay inside their directories; convert is byte-for-byte reproducible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_finetune import RECIPE, tensors, train_losses

from t2r.fsutil import OUTPUT_MARKER, TEMP_TAG, sweep_stale_temps
from t2r.train.run_record import read_run

ROOT = Path(__file__).resolve().parent.parent


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")} if path.exists() else set()


@pytest.fixture(scope="module")
def teacher(tiny_converted):
    return tiny_converted.parent / "teacher"


CASES = {
    # name: (argv built from a context dict, expected stderr fragment, exit code)
    "slots-huge": (["convert", "{teacher}", "{out}", "--num-slots", "1000000"], "--num-slots must be >= 1", 1),
    "window-float": (["convert", "{teacher}", "{out}", "--window", "1e8"], "Invalid value for '--window'", 2),
    "window-huge": (["convert", "{teacher}", "{out}", "--window", "100000000"], "--window must be >= 0", 1),
    "mix-nan": (["convert", "{teacher}", "{out}", "--window", "8", "--window-mix-init", "nan"], "must be finite", 1),
    "gate-init": (["convert", "{teacher}", "{out}", "--gate-init", "zeros"], "--gate-init must be one of", 1),
    "under-proc": (["convert", "{teacher}", "/proc/t2r-out"], "under a system directory", 1),
    "config-list": (["convert", "{listcfg}", "{out}"], "holds a JSON list, not an object", 1),
    "config-bad": (["convert", "{badcfg}", "{out}"], "is not valid JSON", 1),
    "index-escape": (["convert", "{escape}", "{out}"], "points outside", 1),
    "tokens-huge": (["generate", "{conv}", "--prompt", "x", "--max-new-tokens", "1000000000"], "--max-new-tokens", 1),
    "temperature-nan": (["generate", "{conv}", "--prompt", "x", "--temperature", "nan"], "--temperature must be", 1),
    "top-p-zero": (["generate", "{conv}", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]", 1),
    "prompt-empty": (["generate", "{conv}", "--prompt", ""], "--prompt is empty", 1),
    "corpus-empty": (["finetune", "{conv}", "{out}", "--data", "{empty}", "--recipe", RECIPE], "is empty", 1),
    "seq-len": (["finetune", "{conv}", "{out}", "--data", "{text}", "--set", "seq_len=1"], "seq_len must be >= 2", 1),
    "lr-nan": (["finetune", "{conv}", "{out}", "--data", "{text}", "--set", "stages.0.lr=.nan"], "must be finite", 1),
    "export-onto-run": (["export", "{run}", "{run}", "--force"], "is a finetuning run", 1),
    "export-onto-base": (["export", "{run}", "{conv}", "--force"], "overlaps", 1),
    "force-foreign": (["convert", "{teacher}", "{foreign}", "--force"], "was not written by t2r", 1),
    "force-run": (["convert", "{teacher}", "{run}", "--force"], "is a finetuning run", 1),
    "stage-abs-path": (["export", "{planted}", "{out}", "--adapter-only"], "is an absolute path", 1),
    "bad-command": (["convertt", "x"], "No such command", 2),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher, tiny_converted, tiny_run):
    root = tmp_path_factory.mktemp("bad")
    listcfg = root / "listcfg"
    listcfg.mkdir()
    (listcfg / "config.json").write_text("[1, 2]")
    badcfg = root / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.json").write_text("{not json")
    escape = root / "escape"
    escape.mkdir()
    (escape / "config.json").write_text((teacher / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../x.safetensors"}}
    (escape / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "empty.jsonl").write_text("")
    (root / "text.txt").write_text("hello world " * 500)
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    planted = root / "planted-run"
    planted.mkdir()
    record = json.loads((tiny_run / "run.json").read_text())
    record["stages_done"][-1]["output"] = str(tiny_run / record["stages_done"][-1]["output"])
    (planted / "run.json").write_text(json.dumps(record))
    return {
        "teacher": teacher, "conv": tiny_converted, "run": tiny_run, "listcfg": listcfg, "badcfg": badcfg,
        "escape": escape, "empty": root / "empty.jsonl", "text": root / "text.txt", "foreign": foreign,
        "planted": planted, "out": root / "out",
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, capsys):
    argv, expect, code = CASES[case]
    args = [a.format(**inputs) for a in argv]
    watched = [inputs["out"].parent, inputs["run"], inputs["conv"], inputs["foreign"]]
    before = {w: _tree(w) for w in watched}
    rc, lines = run_cli(args, capsys)
    assert rc == code, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("t2r: error") and expect in lines[0], lines
    assert {w: _tree(w) for w in watched} == before  # nothing written, nothing deleted


def test_json_output_never_writes_through_a_planted_link(tiny_converted, tmp_path, capsys):
    """Temporary files are created exclusively under fresh names: a link planted where a fixed temporary name
    would be is never followed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r.json"
    for name in (".r.json.tmp", f".r.json{TEMP_TAG}{os.getpid()}-x"):
        (tmp_path / name).symlink_to(victim)
    args = ["eval", str(tiny_converted), "--no-passkey", "--tasks", "piqa", "--limit", "2", "--device", "cpu"]
    rc, _ = run_cli([*args, "--json", str(out)], capsys)
    # (no piqa data here: the eval fails before writing; run it again with passkey only, which succeeds)
    rc, _ = run_cli(["eval", str(tiny_converted), "--context", "128", "--trials", "1", "--no-teacher",
                     "--device", "cpu", "--json", str(out)], capsys)  # fmt: skip
    assert rc in (0, None) and json.loads(out.read_text())["passkey"]
    assert victim.read_text() == "precious"


def test_force_replaces_what_t2r_wrote_and_nothing_else(teacher, tmp_path, capsys):
    out = tmp_path / "conv"
    assert run_cli(["convert", str(teacher), str(out), "--num-slots", "8"], capsys)[0] in (0, None)
    assert (out / OUTPUT_MARKER).is_file()
    rc, _ = run_cli(["convert", str(teacher), str(out), "--num-slots", "16", "--force"], capsys)
    assert rc in (0, None) and json.loads((out / "config.json").read_text())["gsa_num_slots"] == 16
    before = _tree(teacher)
    rc, lines = run_cli(["convert", str(teacher), str(teacher), "--force"], capsys)  # the source itself
    assert rc == 1 and ("overlaps" in lines[-1] or "not written by t2r" in lines[-1]) and _tree(teacher) == before
    assert not [p for p in tmp_path.iterdir() if TEMP_TAG in p.name]


def test_convert_is_byte_for_byte_reproducible(teacher, tmp_path):
    from t2r.convert import ConvertOptions, convert

    a = convert(str(teacher), tmp_path / "a", ConvertOptions(num_slots=8, gate_init="random"), progress=False)
    b = convert(str(teacher), tmp_path / "b", ConvertOptions(num_slots=8, gate_init="random"), progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask()) for p in a.rglob("*") if p.is_file())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out{TEMP_TAG}{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out{TEMP_TAG}{os.getpid()}-def"
    live.mkdir()
    assert sweep_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_sigterm_mid_convert_leaves_no_temporary(teacher, tmp_path):
    """SIGTERM while the shards are being written: the process exits 143 and removes its temporary directory."""
    code = textwrap.dedent(f"""
        import sys, time
        import t2r.shards as shards
        real = shards.iter_tensors
        def slow(infos):
            for i, item in enumerate(real(infos)):
                if i == 2:
                    print("writing", flush=True)
                    time.sleep(60)
                yield item
        shards.iter_tensors = slow
        import t2r.convert.converter as conv
        conv.iter_tensors = slow
        import t2r.cli
        sys.argv = ["t2r", "convert", {str(teacher)!r}, {str(tmp_path / "out")!r}, "--num-slots", "8"]
        t2r.cli.main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p for p in tmp_path.iterdir() if TEMP_TAG in p.name]  # the half-written output exists now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- fault injection
KILL_AT = {
    # boundary: the patch that SIGKILLs the process there (in the child), for the tiny two-stage recipe
    "mid-checkpoint": "torch.save",  # inside a checkpoint's temporary directory, before its rename
    "after-checkpoint": "Checkpointer.save#2",  # the second checkpoint complete
    "output-before-commit": "save_stage_output#1",  # stage 0's output written, run.json not yet updated
    "commit-before-drop": "Trainer.commit#2",  # stage 0 recorded as finished, its checkpoints still there
    "after-drop": "Checkpointer.drop#1",
}

CHILD = """
import os, signal, sys
import torch
import t2r.train.trainer as trainer
from t2r.train.checkpointer import Checkpointer

where, run, conv, data, recipe = sys.argv[1:6]
name, _, nth = where.partition("#")
nth, calls = int(nth or 1), []

def killing(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs) if name != "torch.save" else None
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs) if name == "torch.save" else out
    return wrapped

if name == "torch.save":
    torch.save = killing(torch.save)
elif name.startswith("Checkpointer."):
    attr = name.split(".")[1]
    setattr(Checkpointer, attr, killing(getattr(Checkpointer, attr)))
elif name == "Trainer.commit":
    trainer.Trainer.commit = killing(trainer.Trainer.commit)
else:
    setattr(trainer, name, killing(getattr(trainer, name)))
trainer.finetune(conv, run, [data], recipe, ["checkpoint_every=2"], progress=False)
"""


@pytest.mark.parametrize("boundary", list(KILL_AT))
def test_kill_at_any_transition_then_resume_gives_the_uninterrupted_run(
    boundary, tiny_converted, corpus_files, tmp_path
):
    from t2r.train.trainer import finetune, resume_run

    full = finetune(str(tiny_converted), tmp_path / "full", corpus_files[:1], RECIPE, ["checkpoint_every=2"],
                    progress=False)  # fmt: skip
    run = tmp_path / "run"
    args = [KILL_AT[boundary], str(run), str(tiny_converted), corpus_files[0], RECIPE]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resume_run(run, progress=False)
    record = read_run(run)
    assert record.status == "done" and [s.name for s in record.stages_done] == ["transfer", "lm"]
    a, b = train_losses(full), train_losses(run)
    assert sorted(b) == sorted(a) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (boundary, step, a[step], b[step])
    ta, tb = tensors(full / "stages" / "00-transfer.safetensors"), tensors(run / "stages" / "00-transfer.safetensors")
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-7) for k in ta)
    assert sorted(p.name for p in (run / "stages").iterdir()) == [
        "00-transfer.safetensors",
        "01-lm",
        "calibrate.safetensors",
    ]
    assert not (run / "checkpoints").exists() and not [p for p in run.rglob("*") if TEMP_TAG in p.name]


def test_resume_with_other_arguments_is_refused_naming_them(tiny_converted, corpus_files, tmp_path, capsys):
    from t2r.train.trainer import finetune

    run = tmp_path / "run"
    finetune(str(tiny_converted), run, corpus_files[:1], RECIPE, stop_after=2, progress=False)
    args = ["finetune", str(tiny_converted), str(run), "--data", corpus_files[1], "--recipe", RECIPE, "--resume"]
    rc, lines = run_cli(args, capsys)
    assert rc == 1 and "--data differ from the run's" in lines[-1] and f"t2r resume {run}" in lines[-1], lines
    rc, lines = run_cli([*args[:4], corpus_files[0], *args[5:], "--set", "seed=3"], capsys)
    assert rc == 1 and "--recipe/--set differ" in lines[-1], lines
    assert read_run(run).status == "running"


def test_a_torn_last_log_line_does_not_block_resume(tiny_converted, corpus_files, tmp_path):
    from t2r.train.trainer import finetune, resume_run

    run = tmp_path / "run"
    finetune(str(tiny_converted), run, corpus_files[:1], RECIPE, stop_after=4, progress=False)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 5, "lo')  # killed mid-append
    resume_run(run, progress=False)
    assert read_run(run).status == "done" and sorted(train_losses(run)) == list(range(1, 13))


def test_a_failed_data_check_leaves_no_run_directory(tiny_converted, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "run"
    args = ["finetune", str(tiny_converted), str(out), "--data", str(short), "--recipe", RECIPE]
    rc, lines = run_cli(args, capsys)
    assert rc == 1 and not out.exists(), lines
    long = tmp_path / "long.txt"
    long.write_text((ROOT / "LICENSE").read_text() * 3)
    rc, _ = run_cli([*args[:4], str(long), *args[5:], "--set", "stages.0.steps=1", "--set", "stages.1.steps=1"], capsys)
    assert rc in (0, None) and read_run(out).status == "done"


def test_new_stage_outputs_hold_only_what_trained(tmp_path, corpus_files):
    """A model with tied embeddings: the frozen (tied) lm_head never lands in a 'new' stage's delta."""
    from conftest import save_tiny_teacher

    from t2r.convert import ConvertOptions, convert
    from t2r.train.trainer import finetune

    save_tiny_teacher(tmp_path / "teacher", tie_word_embeddings=True)
    conv = convert(str(tmp_path / "teacher"), tmp_path / "conv", ConvertOptions(num_slots=8), progress=False)
    stages = "stages=[{name: gates, train: new, steps: 2, loss: {ce: 1}}]"
    run = finetune(str(conv), tmp_path / "run", corpus_files, RECIPE, [stages], progress=False)
    delta = tensors(run / "stages" / "00-gates.safetensors")
    assert {k.split(".")[-2] for k in delta} == {"f_proj", "g_norm"}, sorted(delta)
    mode = (run / "stages" / "00-gates.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()
