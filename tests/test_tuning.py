"""The kernels' tunables: read from the environment once, checked, changed for a block with tuned()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from t2r.kernels.tuning import TUNING, Tuning, half_groups, parse_changes, tuned


def test_environment_sets_the_defaults(monkeypatch):
    monkeypatch.setenv("T2R_GSA_SEGMENT", "128")
    monkeypatch.setenv("T2R_GSA_DOT", "half:out,rev")
    monkeypatch.setenv("T2R_GSA_SAVE_STATES", "1")
    # on by default since an H200 ran and timed them (docs/benchmarks.md, 2026-12-05); the environment turns each off
    on = Tuning()
    assert on.fused_rope and on.fused_window and on.fused_ce and on.scan_parts == 0
    for name in ("FUSED_ROPE", "FUSED_WINDOW", "FUSED_CE"):
        monkeypatch.setenv(f"T2R_GSA_{name}", "0")
    monkeypatch.setenv("T2R_GSA_SCAN_PARTS", "1")
    t = Tuning()
    assert (t.segment, t.dot, t.dot_fp16, t.save_states) == (128, "half:out,rev", True, True)
    assert not (t.fused_rope or t.fused_window or t.fused_ce) and t.scan_parts == 1
    monkeypatch.delenv("T2R_GSA_DOT")
    assert Tuning().dot_fp16 is False


@pytest.mark.parametrize(
    "bad",
    [
        dict(segment=48),
        dict(subchunk=8),
        dict(segment=16, subchunk=32),
        dict(dot="half:nope"),
        dict(impl="cuda"),
        dict(scan_parts=-1),
    ],
)
def test_bad_values_are_refused_and_nothing_changes(bad):
    before = dict(vars(TUNING))
    with pytest.raises(ValueError), tuned(**bad):
        pass
    assert dict(vars(TUNING)) == before


def test_tuned_restores_and_refuses_unknown_names():
    before = TUNING.save_probs
    with tuned(save_probs=not before) as t:
        assert t.save_probs is (not before)
    assert TUNING.save_probs is before
    with pytest.raises(TypeError), tuned(segmnet=32):
        pass


def test_half_groups():
    assert half_groups("tf32") == set() and "rev" in half_groups("half") and half_groups("half:o,out") == {"o", "out"}


def test_a_bad_environment_fails_at_import_with_the_variable_named():
    code = "import t2r.kernels.tuning"
    env = {"T2R_GSA_SEGMENT": "100", "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "T2R_GSA_SEGMENT=100" in out.stderr


def test_a_variants_text_gives_typed_changes():
    """A benchmark variant names tunables and values as text; each value takes its field's type, and dot's own
    commas stay in its value."""
    assert parse_changes("save_states=1, save_probs=false,segment=128,dot=half:out,rev") == {
        "save_states": True, "save_probs": False, "segment": 128, "dot": "half:out,rev",
    }  # fmt: skip
    assert parse_changes("") == {}
    for bad, words in [("segmnet=32", "NAME=VALUE"), ("save_states", "NAME=VALUE"), ("save_states=yes", "1 or 0"),
                       ("segment=big", "integer")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            parse_changes(bad)
