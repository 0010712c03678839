"""Log-likelihoods of continuations as lm-evaluation-harness's HFLM computes them: its tokenization of a (context,
continuation) pair and of rolling windows (``PairEncoder``, ``rolling_windows``), then batched scoring: one row per
distinct input, longest first, right padding, only the scored positions' logits kept, fp32 log_softmax."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from t2r.errors import T2RError


class PairEncoder:
    """Tokenization exactly as lm-eval's HFLM does it.

    - A string is encoded with the tokenizer's default special tokens (so a BOS is added where the tokenizer's
      post-processor adds one), except a string that already starts with the prefix token's text.
    - (context, continuation): trailing whitespace of the context moves to the front of the continuation; the
      concatenation is encoded and split at the length of the encoded context, so the continuation tokens are
      those of the whole string (a merge across the boundary stays with the continuation).
    - An empty context becomes the prefix token (BOS, else EOS), with the continuation encoded without special
      tokens; if the continuation already starts with that token, its first token becomes the context.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if self.prefix_id is None:
            raise T2RError("the tokenizer has neither a BOS nor an EOS token, which lm-eval's scoring needs")
        self.prefix_text = tokenizer.decode(self.prefix_id)

    def encode(self, strings: Sequence[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """Token ids of each string (one batched tokenizer call per special-token setting)."""
        out: list[list[int] | None] = [None] * len(strings)
        groups: dict[bool, list[int]] = {True: [], False: []}
        for i, s in enumerate(strings):
            special = add_special_tokens if add_special_tokens is not None else not s.startswith(self.prefix_text)
            groups[special].append(i)
        for special, idx in groups.items():
            if idx:
                ids = self.tokenizer([strings[i] for i in idx], add_special_tokens=special)["input_ids"]
                for i, row in zip(idx, ids, strict=True):
                    out[i] = list(row)
        return out  # type: ignore[return-value]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        moved = []
        for context, continuation in pairs:
            n = len(context) - len(context.rstrip())
            moved.append(
                (context[: len(context) - n], context[len(context) - n :] + continuation)
                if n
                else (context, continuation)
            )
        strings = sorted({s for c, k in moved if c for s in (c, c + k)})
        table = dict(zip(strings, self.encode(strings), strict=True))
        empty = [k for c, k in moved if not c]
        empty_ids = dict(zip(empty, self.encode(empty, add_special_tokens=False), strict=True))
        out = []
        for context, continuation in moved:
            if context:
                ctx = table[context]
                out.append((ctx, table[context + continuation][len(ctx) :]))
            else:
                cont = empty_ids[continuation]
                out.append(([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:]))
        return out


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token exactly once, as lm-eval's loglikelihood_rolling
    (``get_rolling_token_windows`` with context_len 1, then ``make_disjoint_window``): the first window predicts
    the first ``max_length`` tokens from the prefix token; each later one predicts the next ``max_length`` tokens
    given only the token before them, except the last, which is given as much preceding context as fits in a
    ``max_length``-token input."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        end = done + min(len(tokens) - done, max_length)
        windows.append((tokens[end - max_length - 1 : done], tokens[done:end]))
        done = end
    return windows


# -------------------------------------------------------------------------------------------------- scoring
LOGITS_BYTES_PER_BATCH = 2 << 30  # a batch's kept logits (counted as fp32) stay under this, one row at least
FP32_CHUNK_ELEMENTS = 1 << 26  # log-softmax is taken in fp32 over chunks of at most this many logits
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


def resolve_max_length(model: nn.Module, tokenizer) -> int:
    """lm-eval's default context length: the (text) config's n_positions / max_position_embeddings / n_ctx, else
    the tokenizer's model_max_length when set, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else 2048


@dataclass
class _Row:
    """One forward input shared by every request whose (context + continuation)[:-1] is this sequence."""

    tokens: list[int]
    requests: list[int] = field(default_factory=list)
    longest: int = 0  # the longest continuation scored on this row

    @property
    def first_scored(self) -> int:
        return len(self.tokens) - self.longest


def _rows(requests: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[_Row]:
    """lm-eval's input for a request: (context + continuation) left-truncated to max_length + 1 tokens, minus the
    last token; requests with the same input share one row (lm-eval does so for one-token continuations)."""
    rows: dict[tuple[int, ...], _Row] = {}
    for i, (context, continuation) in enumerate(requests):
        if not continuation or len(continuation) > max_length:
            raise T2RError(f"a continuation of {len(continuation)} tokens cannot be scored (1..{max_length})")
        if not context:
            raise T2RError("a request has no context tokens")
        tokens = (context + continuation)[-(max_length + 1) :][:-1]
        row = rows.setdefault(tuple(tokens), _Row(tokens))
        row.requests.append(i)
        row.longest = max(row.longest, len(continuation))
    # Longest first, as lm-eval sorts: the largest batch runs first, so an out-of-memory error shows at once.
    return sorted(rows.values(), key=lambda r: -len(r.tokens))


def _batches(rows: list[_Row], batch_size: int, vocab: int) -> list[list[_Row]]:
    batches: list[list[_Row]] = []
    for row in rows:
        batch = batches[-1] if batches else None
        if batch is not None and len(batch) < batch_size:
            width = len(batch[0].tokens) - min(r.first_scored for r in [*batch, row])
            if (len(batch) + 1) * width * vocab * 4 <= LOGITS_BYTES_PER_BATCH:
                batch.append(row)
                continue
        batches.append([row])
    return batches


def _autocast(device: torch.device):
    """bf16 autocast on CUDA only (the fast path there); CPU runs in the model's own dtype."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward_kept_logits(model: nn.Module, ids: torch.Tensor, keep: int, takes_keep: bool) -> tuple[torch.Tensor, int]:
    """Logits of the last ``keep`` positions (all of them when the model ignores ``logits_to_keep``) and the
    position of their first column."""
    kwargs = {"logits_to_keep": keep} if takes_keep else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    return logits, ids.shape[1] - logits.shape[1]


def _score_batch(model, batch: list[_Row], requests, device, takes_keep) -> dict[int, tuple[float, bool]]:
    width = len(batch[0].tokens)
    keep = width - min(r.first_scored for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: it follows every scored position
    for b, row in enumerate(batch):
        ids[b, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
    logits, offset = _forward_kept_logits(model, ids.to(device), keep, takes_keep)
    # One flat list of (batch row, logit column, target token, request) over every scored token of the batch.
    b_idx, cols, targets, owner, order = [], [], [], [], []
    for b, row in enumerate(batch):
        for i in row.requests:
            continuation = requests[i][1]
            start = len(row.tokens) - len(continuation)  # logits at position p predict token p + 1
            b_idx += [b] * len(continuation)
            cols += range(start - offset, len(row.tokens) - offset)
            targets += continuation
            owner += [len(order)] * len(continuation)
            order.append(i)
    b_idx_t, cols_t = torch.tensor(b_idx, device=device), torch.tensor(cols, device=device)
    targets_t, owner_t = torch.tensor(targets, device=device), torch.tensor(owner, device=device)
    logprob = torch.empty(len(targets), dtype=torch.float64, device=device)
    misses = torch.empty(len(targets), dtype=torch.long, device=device)
    step = max(1, FP32_CHUNK_ELEMENTS // logits.shape[-1])
    for s in range(0, len(targets), step):
        x = logits[b_idx_t[s : s + step], cols_t[s : s + step]].float()  # fp32 on the needed positions only
        t = targets_t[s : s + step]
        # torch's log_softmax, as lm-eval takes it (x - logsumexp(x) is a little more exact on CPU, but would not match)
        logprob[s : s + step] = torch.log_softmax(x, dim=-1).gather(1, t[:, None])[:, 0].double()
        misses[s : s + step] = (x.argmax(dim=-1) != t).long()
    sums = torch.zeros(len(order), dtype=torch.float64, device=device).index_add_(0, owner_t, logprob)
    wrong = torch.zeros(len(order), dtype=torch.long, device=device).index_add_(0, owner_t, misses)
    return {i: (ll, w == 0) for i, ll, w in zip(order, sums.tolist(), wrong.tolist(), strict=True)}


def score_token_requests(
    model: nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    max_length: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "",
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per (context tokens, continuation tokens) request, as lm-eval's
    ``_loglikelihood_tokens``: the sum of the continuation tokens' log-probabilities (log-softmax in fp32) and
    whether every continuation token is the argmax prediction. Batched: rows sorted longest first, right-padded,
    one forward per batch without an attention mask (exact for causal models: padding follows every scored
    token), only the scored positions' logits kept and normalised."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise T2RError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 50_000)
    results: dict[int, tuple[float, bool]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device), tqdm(total=len(requests), desc=desc, disable=not progress) as bar:
            for batch in _batches(_rows(requests, max_length), batch_size, vocab):
                results.update(_score_batch(model, batch, requests, device, takes_keep))
                bar.update(sum(len(r.requests) for r in batch))
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(requests))]
