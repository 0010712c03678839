"""The one-entry tensor memo that lets a model's layers share their packed layout and the kernels' plans."""

from __future__ import annotations

import torch
from conftest import tiny_gsa_model
from t2r.kernels.gsa_memo import LastTensorMemo

from t2r.modeling import modeling_t2r


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
    """Every layer gets the same position ids; finding document starts (a device wait on GPUs) happens once per
    forward, and the packed layout once, not once per layer."""
    starts_fn, starts_calls = counting(modeling_t2r._find_document_starts)
    layout_fn, layout_calls = counting(modeling_t2r._find_packed_layout)
    monkeypatch.setattr(modeling_t2r, "_document_starts", LastTensorMemo(starts_fn))
    monkeypatch.setattr(modeling_t2r, "_packed_layout", LastTensorMemo(layout_fn))
    model = tiny_gsa_model("llama")
    assert model.config.num_hidden_layers >= 2
    row = torch.randint(3, 101, (1, 20))
    packed = torch.cat([torch.arange(8), torch.arange(12)])[None]
    with torch.no_grad():
        model(row, position_ids=packed, use_cache=False)
        assert (len(starts_calls), len(layout_calls)) == (1, 1)
        model(row, position_ids=packed.clone(), use_cache=False)  # a new forward's tensor: looked at again
        assert (len(starts_calls), len(layout_calls)) == (2, 2)
        model(row, use_cache=False)  # transformers makes the default positions: one check, no documents
        assert (len(starts_calls), len(layout_calls)) == (3, 2)
