"""The one-entry tensor memo behind the kernels' shared plans, and the model's one look per forward at where its
packed documents start."""

from __future__ import annotations

import torch
from conftest import tiny_gsa_model

from t2r.kernels.memo import LastTensorMemo
from t2r.models import modeling_t2r


def counting(fn):
    calls = []

    def wrapped(*args):
        calls.append(args)
        return fn(*args)

    return wrapped, calls


def test_memo_recomputes_only_for_another_tensor_a_modification_or_other_args():
    fn, calls = counting(lambda x, n: x.sum().item() * n)
    memo = LastTensorMemo(fn)
    x = torch.arange(4.0)
    assert memo(x, 2) == memo(x, 2) == 12.0 and len(calls) == 1
    x.add_(1)  # same object, modified in place
    assert memo(x, 2) == 20.0 and len(calls) == 2
    assert memo(x, 3) == 30.0 and len(calls) == 3
    assert memo(x.clone(), 3) == 30.0 and len(calls) == 4  # equal values, another tensor
    with torch.inference_mode():
        y = torch.ones(2)
        assert memo(y, 1) == memo(y, 1) == 2.0 and len(calls) == 6  # no version counter: never memoised


def test_model_layers_share_one_document_layout_per_forward(monkeypatch):
    """Every layer gets the same position ids; finding the packed documents (a device wait on GPUs) happens once
    per forward, not once per layer, and not at all without position ids."""
    rows_fn, calls = counting(modeling_t2r.document_rows)
    monkeypatch.setattr(modeling_t2r, "document_rows", rows_fn)
    model = tiny_gsa_model("llama")
    assert model.config.num_hidden_layers >= 2
    row = torch.randint(3, 101, (1, 20))
    packed = torch.cat([torch.arange(8), torch.arange(12)])[None]
    with torch.no_grad():
        model(row, position_ids=packed, use_cache=False)
        assert len(calls) == 1
        model(row, position_ids=packed.clone(), use_cache=False)
        assert len(calls) == 2
        model(row, use_cache=False)  # transformers makes the default positions: one sequence per row
        assert len(calls) == 3 and calls[-1][0] is None
