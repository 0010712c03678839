"""The student's forward and backward of one micro-batch, replayed as a CUDA graph (recipe ``graphs: true``).

A small model's eager step is bound by the host: at SmolLM2-135M, 1 x 4k, an H200 is busy ~23 ms of a 90-150 ms
step (docs/benchmarks.md), and a replayed graph issues the whole step at once. What a graph cannot do is look at
its inputs: packed rows hold a different number of documents every batch, and the kernels' grids are sized by
them. So the layout is planned on the host, from the batch's position ids before they reach the device, into
buffers of fixed capacity (:class:`t2r.kernels.chunk.StaticPlan`): one graph per capacity, a power of two of
documents, kept while the stage runs.

The step writes only fixed buffers: the loss sums it returns, and the parameters' gradients, which it adds to (so
micro-batches accumulate, and the optimizer, clipping and the finite-loss check stay outside, as in eager steps).
A distillation loss runs the teacher's forward inside the same graph: transformers builds the teacher's packed
mask from the position ids on the device when a stream is capturing (its look at them on the host is skipped).
On the CPU, ``emulate`` runs the same machinery, each "replay" a call under :class:`NoHostReads`: a step that read
a tensor back, or sized an output by its values, fails there as its capture would on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from t2r.kernels.chunk import StaticPlan
from t2r.kernels.layout import next_pow2
from t2r.kernels.tuning import TUNING
from t2r.models.cuda_graphs import capture_after_warmup
from t2r.models.modeling_t2r import DocumentRows, document_rows
from t2r.train.losses import ce_loss_sum, kd_loss_sum

if TYPE_CHECKING:
    from t2r.train.distill import Teacher

MAX_GRAPHS = 6  # document capacities kept per stage (each graph holds its own buffers; activations share a pool)
MIN_DOCUMENTS = 8
WARMUP = 2  # eager calls before a capture: Triton compiles, the allocator and cuBLAS settle (emulated: 1)
# aten ops that read a tensor's values on the host, or size their output by them: a capture cannot run them.
HOST_READS = {
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "equal", "is_nonzero", "repeat_interleave", "allclose",
}  # fmt: skip


class CaptureFailed(RuntimeError):
    """A graph could not be captured (the step's gradients are as they were): run the micro-batch eagerly."""


class NoHostReads(TorchDispatchMode):
    """Fails any op of :data:`HOST_READS`, as a CUDA graph capture would (there with an opaque error)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            raise RuntimeError(f"aten.{name} reads a tensor on the host inside a graphed step")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _transformers_sees_a_capture() -> Iterator[None]:
    """What transformers' masks do while a stream is capturing (the teacher's, under KD): they skip their looks at
    tensors on the host (is this batch packed? is any of it padded?) and build the mask on the device."""
    from transformers import masking_utils

    tracing = masking_utils.is_tracing
    masking_utils.is_tracing = lambda *args, **kwargs: True
    try:
        yield
    finally:
        masking_utils.is_tracing = tracing


class StaticDocuments:
    """The packed documents of ``rows`` x ``length`` tokens, up to ``documents`` of them, in fixed device buffers
    (:class:`t2r.models.modeling_t2r.DocumentRows` for the layers, a :class:`StaticPlan` for the GSA kernels)."""

    def __init__(self, rows: int, length: int, documents: int, device: torch.device):
        self.plan = StaticPlan(rows, length, documents + 1, device, TUNING.segment)
        zeros = dict(device=device, dtype=torch.int64)
        self.rows = DocumentRows(
            starts=torch.zeros(rows, length, dtype=torch.bool, device=device),
            cu_seqlens=self.plan.bounds,
            row_first=torch.zeros(rows, **zeros),
            row_last=torch.zeros(rows, **zeros),
            numbers=torch.zeros(rows, length, **zeros),
        )

    def fill(self, layout: DocumentRows) -> None:
        """Copy a layout computed on the host (:func:`document_rows` with ``always``) into the buffers."""
        self.plan.fill(layout.cu_seqlens)
        for buffer, host in zip(self.rows, layout, strict=True):
            if buffer is not self.plan.bounds:
                buffer.copy_(host, non_blocking=True)


def documents_capacity(documents: int, tokens: int) -> int:
    """The capacity of the graph that takes ``documents``: a power of two, so that few graphs serve a stage."""
    return min(max(MIN_DOCUMENTS, next_pow2(documents)), tokens)


@dataclass
class _Captured:
    inputs: dict[str, torch.Tensor]
    docs: StaticDocuments
    denominator: torch.Tensor
    sums: dict[str, torch.Tensor]
    replay: Callable[[], None]


class GraphedStudentStep:
    """Forward and backward of the student's losses on one micro-batch (:meth:`__call__`), replayed from a CUDA
    graph per document capacity. ``weights`` are the stage's loss weights (``ce``, and ``kd`` with ``teacher``).
    The parameters that train must keep their gradient tensors between steps (zero them, do not set them to
    None)."""

    def __init__(
        self,
        model: nn.Module,
        weights: dict[str, float],
        precision: str,
        device: torch.device,
        teacher: Teacher | None = None,
        temperature: float = 1.0,
        emulate: bool = False,
    ):
        if set(weights) - {"ce", "kd"} or ("kd" in weights) != (teacher is not None):
            raise ValueError(f"a graphed step takes ce and kd (with a teacher), not {sorted(weights)}")
        self.model, self.weights, self.device, self.emulate = model, weights, device, emulate
        self.teacher, self.temperature = teacher, temperature
        self.bf16, self.warmup = precision == "bf16", 1 if emulate else WARMUP
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, batch: dict[str, torch.Tensor], labels_global: int) -> dict[str, torch.Tensor]:
        """The micro-batch's share of each loss's mean over the step (device scalars); its gradients are added to
        the parameters'. ``batch`` is on the host. :class:`CaptureFailed` where its graph cannot be captured."""
        rows, length = batch["input_ids"].shape
        layout = document_rows(batch["position_ids"], rows, length, always=True)
        documents = len(layout.cu_seqlens) - 1
        key = (rows, length, documents_capacity(documents, rows * length), "label_weights" in batch)
        graph = self.graphs.get(key) or self._capture(key, batch, layout, labels_global)
        for name, buffer in graph.inputs.items():
            buffer.copy_(batch[name], non_blocking=True)
        graph.docs.fill(layout)
        graph.denominator.fill_(labels_global)
        graph.replay()
        return graph.sums

    def _forward_backward(self, inputs: dict, docs: StaticDocuments, denominator: torch.Tensor, sums: dict) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
            if self.bf16
            else contextlib.nullcontext()
        )  # under capture the autocast cache's casts would outlive their use in the graph's pool
        labels, label_weights = inputs["labels"], inputs.get("label_weights")
        with autocast:
            logits = self.model(
                input_ids=inputs["input_ids"],
                position_ids=inputs["position_ids"],
                use_cache=False,
                gsa_documents=docs.rows,
            ).logits
            totals = {}
            if "ce" in self.weights:
                totals["ce"] = ce_loss_sum(logits, labels, label_weights)
            if self.teacher is not None:
                teacher_logits = self.teacher.logits(self.model, inputs)
                totals["kd"] = kd_loss_sum(logits, teacher_logits, labels, self.temperature, label_weights)
        for name, total in totals.items():
            sums[name].copy_(total.detach().double() / denominator)
        (sum(self.weights[name] * total for name, total in totals.items()) / denominator).backward()

    def _capture(self, key: tuple, batch: dict, layout: DocumentRows, labels_global: int) -> _Captured:
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        rows, length, capacity, _ = key
        inputs = {name: batch[name].to(self.device).clone() for name in batch}
        docs = StaticDocuments(rows, length, capacity, self.device)
        docs.fill(layout)
        denominator = torch.full((), float(labels_global), device=self.device)
        sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.weights}

        def step() -> None:
            self._forward_backward(inputs, docs, denominator, sums)

        try:
            with self._grads_kept():
                replay = self._emulated(step) if self.emulate else self._cuda_graph(step)
        except Exception as err:  # what stops a capture is anything the step did under it
            raise CaptureFailed(str(err).splitlines()[0][:200] if str(err) else type(err).__name__) from err
        graph = self.graphs[key] = _Captured(inputs, docs, denominator, sums, replay)
        return graph

    @contextlib.contextmanager
    def _grads_kept(self) -> Iterator[None]:
        """The warm-up calls add to the gradients: put back what earlier micro-batches of the step accumulated
        (and make every gradient a tensor the graph can add to)."""
        kept = [None if p.grad is None else p.grad.clone() for p in self.params]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        try:
            yield
        finally:
            for p, g in zip(self.params, kept, strict=True):
                p.grad.copy_(g) if g is not None else p.grad.zero_()

    def _emulated(self, step: Callable[[], None]) -> Callable[[], None]:
        def replay() -> None:
            with NoHostReads(), _transformers_sees_a_capture():
                step()

        for _ in range(self.warmup):
            step()
        grads = [p.grad for p in self.params]
        replay()  # the "capture"
        if any(p.grad is not g for p, g in zip(self.params, grads, strict=True)):
            raise RuntimeError("the step replaced a gradient tensor: a replay would not add to the new one")
        return replay

    def _cuda_graph(self, step: Callable[[], None]) -> Callable[[], None]:
        grads = [p.grad for p in self.params]
        graph, _ = capture_after_warmup(step, self.warmup, self.device, self.pool)
        if any(p.grad is not g for p, g in zip(self.params, grads, strict=True)):
            raise RuntimeError("the captured backward replaced a gradient tensor: replays would not add to it")
        return graph.replay
