"""Training corpora: files -> documents (datasets) -> tokens (cached by datasets) -> packed fixed-length rows.

Rows keep document boundaries: every document (and every row) starts a new position-id run at 0, which the
GSA layers treat as a state reset and transformers' masks treat as a new sequence, so no document can
influence another. The first token of each document gets no label (it has no in-document context).
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2r.errors import T2RError, first_line

TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".txt.bz2", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.xz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
IGNORE_INDEX = -100
_SEGMENT_CHARS = 200_000  # long documents are tokenized in newline-aligned pieces


def _kind(path: str) -> str | None:
    name = path.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def expand_data_paths(specs: list[str]) -> list[str]:
    """Files named by SPECS: files, globs, directories (searched recursively) or save_to_disk directories."""
    if not specs:
        raise T2RError("no data given (use --data FILE, a glob, or a directory)")
    found: list[str] = []
    for spec in specs:
        for part in [p for p in spec.split(",") if p]:
            path = Path(part).expanduser()
            if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
                found.append(str(path))
            elif path.is_dir():
                files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _kind(str(p)))
                if not files:
                    raise T2RError(f"data directory {part} holds no .txt/.jsonl/.parquet files")
                found += files
            elif any(ch in part for ch in "*?["):
                files = sorted(glob.glob(os.path.expanduser(part), recursive=True))
                if not files:
                    raise T2RError(f"no data files match {part}")
                found += files
            elif path.is_file():
                found.append(str(path))
            else:
                raise T2RError(f"data file {part} not found")
    bad = [f for f in found if not Path(f).is_dir() and _kind(f) is None]
    if bad:
        raise T2RError(f"unsupported data file {bad[0]} (use .txt, .jsonl, .json, .parquet or a save_to_disk dir)")
    return found


def load_documents(specs: list[str], text_field: str = "text", encoding_errors: str = "strict"):
    """One ``datasets.Dataset`` with a single ``text`` column; each .txt file is one document.

    ``encoding_errors`` applies to text files ("strict", "replace", "ignore"), as in ``bytes.decode``."""
    import datasets

    parts = []
    for path in expand_data_paths(specs):
        if Path(path).is_dir():
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            kind = _kind(path)
            if Path(path).stat().st_size == 0:
                raise T2RError(f"data file {path} is empty")
            kwargs = {"sample_by": "document", "encoding_errors": encoding_errors} if kind == "text" else {}
            try:
                ds = datasets.load_dataset(kind, data_files=[path], split="train", **kwargs)
            except Exception as e:  # datasets raises many types for unreadable files
                cause = e.__cause__ or e.__context__
                if isinstance(cause, UnicodeDecodeError):
                    raise T2RError(
                        f"{path} is not valid UTF-8 ({cause.reason} at byte {cause.start}); set "
                        "data.encoding_errors=replace to decode it anyway"
                    ) from None
                raise T2RError(f"cannot read {path}: {first_line(e)}") from None
        field = "text" if _kind(path) == "text" else text_field
        if field not in ds.column_names:
            raise T2RError(f"{path} has no field {field!r} (fields: {', '.join(ds.column_names)}); set data.text_field")
        parts.append(
            ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])
        )
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(docs) == 0:
        raise T2RError(f"the corpus {', '.join(specs)} is empty")
    return docs


def _segments(text: str) -> list[str]:
    if len(text) <= _SEGMENT_CHARS:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(start + _SEGMENT_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + _SEGMENT_CHARS // 2, end)
            end = cut + 1 if cut > 0 else end
        out.append(text[start:end])
        start = end
    return out


class _Tokenize:
    """Picklable tokenizing function (datasets fingerprints it to cache the result)."""

    def __init__(self, tokenizer, add_eos: bool):
        self.tokenizer = tokenizer
        self.eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []

    def __call__(self, batch):
        ids = []
        for text in batch["text"]:
            pieces = self.tokenizer(_segments(text), add_special_tokens=False)["input_ids"]
            ids.append([t for piece in pieces for t in piece] + self.eos)
        return {"input_ids": ids}


def tokenize_documents(docs, tokenizer, add_eos: bool = True):
    """Token ids per document; datasets caches the result next to the loaded corpus."""
    return docs.map(
        _Tokenize(tokenizer, add_eos), batched=True, batch_size=16, remove_columns=["text"], desc="tokenize"
    )


@dataclass
class PackedRows:
    """Fixed-length training rows: token ids and document starts (both [rows, seq_len]), and optionally a loss
    weight per label (float32, same shape; None means 1 everywhere)."""

    input_ids: np.ndarray
    doc_start: np.ndarray
    weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, rows: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.input_ids[rows].astype(np.int64))
        starts = torch.from_numpy(self.doc_start[rows])
        out = {"input_ids": ids, "position_ids": positions_from_starts(starts), "labels": labels_for(ids, starts)}
        if self.weight is not None:
            out["label_weights"] = torch.from_numpy(self.weight[rows])
        return out

    def label_count(self, rows) -> int:
        return int((~self.doc_start[rows]).sum())

    def select(self, rows) -> PackedRows:
        weight = None if self.weight is None else self.weight[rows]
        return PackedRows(self.input_ids[rows], self.doc_start[rows], weight)


def positions_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Position ids counting from 0 at every document start."""
    idx = torch.arange(starts.shape[-1]).expand_as(starts)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - last_start


def labels_for(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[starts] = IGNORE_INDEX  # never predict a document's first token from another document
    return labels


def pack_documents(token_docs, seq_len: int) -> PackedRows:
    """Concatenate documents and cut fixed rows; a document running past a row continues in the next row as a
    new segment (its state resets there). The incomplete last row is dropped."""
    lengths = np.fromiter((len(x) for x in token_docs["input_ids"]), dtype=np.int64, count=len(token_docs))
    total = int(lengths.sum())
    if total < seq_len:
        raise T2RError(f"sequence length {seq_len} is larger than the whole corpus ({total} tokens)")
    flat = np.empty(total, dtype=np.int32)
    starts = np.zeros(total, dtype=bool)
    offset = 0
    for ids in token_docs["input_ids"]:
        flat[offset : offset + len(ids)] = ids
        starts[offset] = True
        offset += len(ids)
    n_rows = total // seq_len
    rows = flat[: n_rows * seq_len].reshape(n_rows, seq_len)
    row_starts = starts[: n_rows * seq_len].reshape(n_rows, seq_len).copy()
    row_starts[:, 0] = True
    return PackedRows(rows, row_starts)


def split_rows(rows: PackedRows, eval_fraction: float, salt: str = "t2r-eval") -> tuple[PackedRows, PackedRows]:
    """Deterministic hash split of rows into train and held-out (disjoint text, independent of row order)."""
    if eval_fraction <= 0:
        return rows, rows.select(np.arange(0))
    keys = [hashlib.blake2b(salt.encode() + row.tobytes(), digest_size=8).digest() for row in rows.input_ids]
    score = np.array([int.from_bytes(k, "little") / 2**64 for k in keys])
    held = score < eval_fraction
    if not held.any():
        held[int(np.argmin(score))] = True
    if held.all():
        raise T2RError("the corpus is too small to hold out an evaluation split")
    return rows.select(np.flatnonzero(~held)), rows.select(np.flatnonzero(held))


class RowSampler:
    """Epoch-wise seeded permutations of the training rows; the cursor (epoch, position) is all its state."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self._epoch, self._perm = -1, None

    def take(self, count: int, state) -> list[int]:
        """``count`` row indices from ``state``'s cursor (``epoch``, ``cursor``), which moves past them."""
        rows = []
        while len(rows) < count:
            if self._epoch != state.epoch:
                gen = torch.Generator().manual_seed(self.seed * 7919 + state.epoch)
                self._perm, self._epoch = torch.randperm(self.n_rows, generator=gen).tolist(), state.epoch
            take = min(count - len(rows), self.n_rows - state.cursor)
            rows += self._perm[state.cursor : state.cursor + take]
            state.cursor += take
            if state.cursor == self.n_rows:
                state.epoch, state.cursor = state.epoch + 1, 0
        return rows


def build_rows(data: list[str], eval_data: list[str] | None, tokenizer, recipe, info) -> tuple[PackedRows, PackedRows]:
    """Packed train and held-out rows. Rank 0 tokenizes first so the others hit the datasets cache."""
    from t2r.train.distributed import barrier

    def make(specs):
        docs = load_documents(specs, recipe.data.text_field, recipe.data.encoding_errors)
        return pack_documents(tokenize_documents(docs, tokenizer, recipe.data.add_eos), recipe.seq_len)

    result = None
    for turn in (0, 1):
        if (turn == 0) == info.is_main:
            train = make(data)
            result = (train, make(eval_data)) if eval_data else split_rows(train, recipe.data.eval_fraction)
        barrier(info)
    return result
