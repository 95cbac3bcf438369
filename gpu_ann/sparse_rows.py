"""Row-sparse gradients that share their rows: which lazy parameters do, and coalescing them with one sort.

The output layer's weight and bias are read by one gather (``gpu_ann.sampled.sampled_softmax_loss``), so
their sparse gradients hold one index tensor. Coalescing them side by side sorts those rows once: on CUDA
one host-device sync instead of two. Used by ``gpu_ann.optim.LazyAdam`` in one process and by
``gpu_ann.sparse_gather`` under torchrun.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Lazy parameters whose sparse gradients hold the same rows: one gather gives both (sampled_softmax_loss).
_SHARED_ROWS = (("out.weight", "out.bias"),)


def row_groups(names: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """``names`` in groups whose sparse gradients share their rows: the output layer's weight and bias, each
    other table alone; in the order of ``names``.

    Parameters
    ----------
    names : iterable of str
        Lazy parameter names (:func:`gpu_ann.optim.lazy_tables`).

    Returns
    -------
    tuple of tuples of str
    """
    names = tuple(names)
    groups, placed = [], set()
    for name in names:
        if name in placed:
            continue
        shared = next((g for g in _SHARED_ROWS if name in g and all(n in names for n in g)), (name,))
        groups.append(shared)
        placed.update(shared)
    return tuple(groups)


def shares_rows(grads: list) -> bool:
    """Row-sparse gradients that hold one index tensor (the same memory), so one sort serves them all."""
    if any(g is None or not g.is_sparse or g.sparse_dim() != 1 for g in grads):
        return False
    first, *rest = [g._indices() for g in grads]
    same = [i.data_ptr() == first.data_ptr() and i.shape == first.shape and i.stride() == first.stride() for i in rest]
    return all(same) and len({(g.shape[0], g.dtype, g.device) for g in grads}) == 1


def joined_values(grads: list) -> torch.Tensor:
    """The values of gradients that share their rows side by side, ``[nnz, total width]`` (a bias is 1 wide).

    A gradient alone is a view of its values, not a copy (the item table's hold a row per bag entry).
    """
    nnz = grads[0]._nnz()
    values = [g._values().reshape(nnz, -1) for g in grads]
    return values[0] if len(values) == 1 else torch.cat(values, dim=1)


def coalesce_joined(indices: torch.Tensor, values: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the repeated rows of ``values [N, w]`` at ``indices [1, N]``: the distinct rows and their sums.

    One sort for every column; each column's sums are those it gets coalesced alone (the same additions in
    the same order). On CUDA a host-device sync (the number of distinct rows).
    """
    joint = torch.sparse_coo_tensor(indices, values, (n_rows, values.shape[1]), check_invariants=False)
    joint = joint.coalesce()  # host-device sync on CUDA
    return joint.indices(), joint.values()


def split_joined(indices: torch.Tensor, values: torch.Tensor, like: list) -> list:
    """Coalesced gradients shaped as the tensors in ``like``, from distinct ``indices`` and joined ``values``.

    They are marked coalesced, so RowAdam's ``coalesce()`` returns them as they are (no sort, no sync).
    """
    widths = [math.prod(t.shape[1:]) for t in like]
    parts = values.split(widths, dim=1) if len(like) > 1 else (values,)
    return [
        torch.sparse_coo_tensor(
            indices, part.reshape(-1, *t.shape[1:]).contiguous(), t.shape, is_coalesced=True, check_invariants=False
        )
        for part, t in zip(parts, like)
    ]


def coalesce_together(grads: list) -> list:
    """Coalesce gradients that share their rows (:func:`shares_rows`) with one sort: equal to coalescing each.

    Parameters
    ----------
    grads : list of torch.Tensor
        Uncoalesced sparse COO gradients, ``sparse_dim`` 1, with one index tensor.

    Returns
    -------
    list of torch.Tensor
        Their coalesced versions, in order, sharing the distinct rows (on CUDA one host-device sync in all).
    """
    indices, values = coalesce_joined(grads[0]._indices(), joined_values(grads), grads[0].shape[0])
    return split_joined(indices, values, grads)
