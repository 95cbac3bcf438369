"""What a training step minimises: one batch, either input path, either softmax, in the chosen precision.

The trainer calls :meth:`Objective.loss` on whatever its loader yields (a dense ``Batch`` or sparse
``Bags``) and never branches on the path, the softmax or the device itself. Evaluation always uses the
full softmax (:meth:`Objective.summed_cross_entropy`), whatever the training loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection

import torch
import torch.nn.functional as F

from gpu_ann.bags import Bags
from gpu_ann.model import CandidateGenerator
from gpu_ann.sampled import NegativeSampler, sampled_softmax_loss

PRECISIONS = ("fp32", "bf16")
SOFTMAXES = ("full", "sampled")


def hidden_and_labels(model: CandidateGenerator, batch, sparse_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden layer of a dense ``(X, y)`` batch or of :class:`~gpu_ann.bags.Bags`, and its labels.

    Parameters
    ----------
    model : CandidateGenerator
        The model.
    batch : gpu_ann.loader.Batch or gpu_ann.bags.Bags
        What a :class:`~gpu_ann.loader.BatchLoader` yields on either path.
    sparse_grad : bool
        On the sparse path, a sparse gradient for the item table (the dense path's is always dense).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``[B, h2]`` and the ``[B]`` int64 target items.
    """
    if isinstance(batch, Bags):
        return model.hidden_bags(batch.indices, batch.offsets, batch.weights, batch.features, sparse_grad), batch.labels
    X, y = batch
    return model.hidden(X), y


class Objective:
    """The loss of one training batch for a model, an input path, a softmax and a precision.

    Parameters
    ----------
    model : CandidateGenerator
        The model being trained (its parameters stay float32: the master weights).
    sampler : NegativeSampler, optional
        Draws each batch's negatives; given, the loss is the sampled softmax with the log-Q correction
        (:func:`gpu_ann.sampled.sampled_softmax_loss`), otherwise the full softmax over every item.
    precision : {"fp32", "bf16"}
        ``"bf16"`` runs forward and loss under ``torch.autocast`` in bfloat16 (on the CPU as on the GPU);
        the logits' log-softmax is still taken in float32.
    compile : bool
        Wrap the loss computation in ``torch.compile`` (compiled on first use; the sparse path's batches
        vary in total bag length, so it is compiled with dynamic shapes).
    sparse_grad : collection of str
        Parameters to give sparse gradients, among those a step reads only some rows of: the first layer's
        item table on the sparse path (``"embed.item_table"``), the output layer under the sampled softmax
        (``"out.weight"`` and ``"out.bias"``, together). The optimiser must then be
        :class:`gpu_ann.optim.LazyAdam` over exactly those (:func:`gpu_ann.optim.lazy_tables`).

    Raises
    ------
    ValueError
        An unknown ``precision``, ``compile`` with ``sparse_grad`` (torch.compile does not trace
        ``embedding_bag``'s sparse gradient), or ``sparse_grad`` naming one of ``out.weight`` and ``out.bias``
        without the other.
    """

    def __init__(
        self,
        model: CandidateGenerator,
        sampler: NegativeSampler | None = None,
        precision: str = "fp32",
        compile: bool = False,
        sparse_grad: Collection[str] = (),
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: expected one of {PRECISIONS}")
        if compile and sparse_grad:
            raise ValueError("compile and sparse_grad cannot be combined: torch.compile fails on sparse gradients")
        self.model = model
        self.sampler = sampler
        self.precision = precision
        self.sparse_grad = tuple(sparse_grad)
        self._sparse_items = "embed.item_table" in self.sparse_grad
        self._sparse_out = "out.weight" in self.sparse_grad
        if self._sparse_out != ("out.bias" in self.sparse_grad):
            # One gather gives both their gradients: a sparse bias beside a dense weight (or the reverse) would
            # reach an optimiser that expects the other kind.
            raise ValueError(f"sparse_grad must name out.weight and out.bias together, got {list(self.sparse_grad)}")
        self._device_type = next(model.parameters()).device.type
        self._loss = torch.compile(self._eager_loss, dynamic=True) if compile else self._eager_loss

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context for forward passes (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=torch.bfloat16)

    def _eager_loss(self, batch, negatives, log_q) -> torch.Tensor:
        h, y = hidden_and_labels(self.model, batch, self._sparse_items)
        out = self.model.out
        if negatives is None:
            return F.cross_entropy(out(h).float(), y)
        return sampled_softmax_loss(h, out.weight, out.bias, y, negatives, log_q, sparse_grad=self._sparse_out)

    def loss(self, batch) -> torch.Tensor:
        """The mean training loss of one batch (a scalar on the device; nothing is read back).

        Parameters
        ----------
        batch : gpu_ann.loader.Batch or gpu_ann.bags.Bags
            One batch of the training loader.

        Returns
        -------
        torch.Tensor
            Float32 scalar, ready for ``backward()``.
        """
        # The draw happens outside the compiled region: it advances the sampler's own generator.
        negatives, log_q = self.sampler.sample() if self.sampler is not None else (None, None)
        with self.autocast():
            return self._loss(batch, negatives, log_q)

    def summed_cross_entropy(self, batch) -> torch.Tensor:
        """Full-softmax cross-entropy summed over a batch, for evaluation (call it under ``no_grad``).

        Parameters
        ----------
        batch : gpu_ann.loader.Batch or gpu_ann.bags.Bags
            One evaluation batch.

        Returns
        -------
        torch.Tensor
            Float32 scalar on the device.
        """
        with self.autocast():
            h, y = hidden_and_labels(self.model, batch)
            return F.cross_entropy(self.model.out(h).float(), y, reduction="sum")
