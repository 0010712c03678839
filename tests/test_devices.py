"""--device: a device this machine lacks, or a name that is no device, is one clear line and a non-zero exit."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from t2r.devices import resolve_device
from t2r.errors import T2RError

CUDA = torch.cuda.is_available()
MISSING = "cuda:99" if CUDA else "cuda"  # a CUDA device this machine does not have
MISSING_MSG = "CUDA device(s)" if CUDA else "this machine has no CUDA device (use --device cpu)"


def test_default_is_cuda_when_present():
    assert resolve_device(None) == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize(("device", "expect"), [("gpu0", "not a device"), (MISSING, MISSING_MSG)])
def test_bad_device_is_one_error(device, expect):
    with pytest.raises(T2RError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(device)


def test_eval_on_a_missing_device(tiny_converted, corpus_files, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_converted), "--data", corpus_files[0], "--device", MISSING, "--json", str(out)]
    code, lines = run_cli(args, capsys)
    assert code == 1 and lines[-1].startswith("t2r: error: ") and MISSING_MSG in lines[-1], lines
    assert not out.exists()


@pytest.mark.parametrize("command", [["generate", "PATH", "--prompt", "hi"], ["bench", "train", "PATH"]])
def test_generate_and_bench_on_a_missing_device(tiny_converted, capsys, command):
    args = [str(tiny_converted) if a == "PATH" else a for a in command] + ["--device", MISSING]
    code, lines = run_cli(args, capsys)
    assert code == 1 and lines[-1].startswith("t2r: error: ") and MISSING_MSG in lines[-1], lines
