"""Streaming safetensors I/O: read a sharded checkpoint tensor by tensor, write re-sharded output with an index.

Nothing here holds more than one output shard in memory, which is what lets a 7B checkpoint convert on a
small machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from t2r.errors import T2RError
from t2r.fsutil import confined, read_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _ST_DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise T2RError(f"cannot read size {text!r} (use e.g. 2GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise T2RError(f"unreadable shard index {index}: no weight_map of tensor names to files")
        names = list(dict.fromkeys(weight_map.values()))
        paths = [confined(model_dir, n, f"shard index {index}") for n in names]
        missing = [n for n, p in zip(names, paths, strict=True) if not p.is_file()]
        if missing:
            raise T2RError(f"checkpoint {model_dir} is missing shard(s) {', '.join(missing)} listed in {INDEX_NAME}")
        return paths
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise T2RError(
            f"{model_dir} holds only pickled weights (.bin/.pt); t2r reads safetensors only "
            "(convert them with transformers' save_pretrained first)"
        )
    raise T2RError(f"no safetensors weights in {model_dir}")


def read_tensor_infos(shards: list[Path]) -> list[TensorInfo]:
    """Headers of every shard; raises a one-line error for a truncated or corrupt file."""
    infos: list[TensorInfo] = []
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(name)
                    infos.append(TensorInfo(name, shard, sl.get_dtype(), tuple(sl.get_shape())))
        except (SafetensorError, OSError) as e:
            raise T2RError(f"corrupt or truncated shard {shard.name}: {e}") from None
    return infos


def iter_tensors(infos: list[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield tensors one at a time as private copies.

    safetensors hands out views of a memory map; every page read through one stays in this process's RSS
    until the map closes. Re-opening per tensor and copying keeps RSS at what the caller holds, so a 10 GB
    shard never becomes 10 GB of resident memory.
    """
    for info in infos:
        try:
            with safe_open(str(info.shard), framework="pt") as f:
                view = f.get_tensor(info.name)
                tensor = view.clone()
                del view
        except SafetensorError as e:
            raise T2RError(f"corrupt shard {info.shard.name}: {e}") from None
        yield info, tensor


class ShardWriter:
    """Accumulate tensors and flush a safetensors shard whenever ``max_shard_bytes`` would be exceeded;
    ``close`` names the shards model-0000i-of-0000n and writes the index (or a single model.safetensors)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"duplicate tensor {name}")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = self.out_dir / SINGLE_NAME
            self._written[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._written):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return finals
