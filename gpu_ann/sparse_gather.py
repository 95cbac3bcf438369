"""Lazy Adam under ``torchrun``: every rank's sparse gradient rows, gathered for all lazy tables at once.

The ranks' rows differ, so sparse gradients cannot be summed in place as the dense ones are
(``Replicas.average_gradients``). Per step, for the lazy tables in row groups (the output layer's weight and
bias share their rows, :func:`gpu_ann.sparse_rows.row_groups`):

1. each rank coalesces each group's gradient once (:func:`local_rows`; on CUDA a host-device sync per group,
   the number of distinct rows);
2. the ranks exchange every group's row count in one all-gather of ``[W x groups]`` numbers, read on the host
   with one ``tolist()`` (a host-device sync: the padded sizes of what follows);
3. two all-gathers move every group's rows (int64) and values, each rank's padded to the longest rank's;
4. each rank concatenates the ranks' rows in rank order, divides by ``W`` and coalesces each group once more
   (:func:`merged_gradients`; on CUDA a sync per group), marking the result coalesced, so RowAdam sorts nothing.

So a step makes 3 collectives and at most ``2 x groups + 1`` host-device syncs on CUDA (a gradient of fewer
than two rows is coalesced without one): 5 with the item table and the output layer, 3 with one of them.
The arithmetic is that of coalescing each rank's gradient, then the concatenation over ``W``: the same bits
as when each parameter was gathered and coalesced on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from gpu_ann.sparse_rows import coalesce_joined, joined_values, shares_rows, split_joined

# all_gather into one tensor: all_gather_single from torch 2.13 (all_gather_into_tensor is deprecated there).
_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# Backends found without it in this process (gloo in some torch releases), with the error they gave.
WITHOUT_SINGLE_GATHER: dict[str, str] = {}
_PROBED: dict[str, tuple] = {}  # backend -> the probe's tensors, held for the process (gloo reads them late)


def all_gather_flat(out: torch.Tensor, tensor: torch.Tensor) -> list:
    """Every rank's 1-D ``tensor`` into ``out`` (``[W x len]``, in rank order); returns the tensors to hold.

    One collective into one tensor where the backend has it (:func:`_has_single_gather`), else
    ``all_gather`` into views of ``out``.
    """
    if _has_single_gather(out.device):
        _GATHER_SINGLE(out, tensor)  # a failure here is the group's, raised as it is
        return [out, tensor]
    parts = list(out.view(dist.get_world_size(), -1).unbind(0))  # (W, 0) when no rank sends anything
    dist.all_gather(parts, tensor)
    return [out, tensor, *parts]


def _has_single_gather(device: torch.device) -> bool:
    """Whether this process group's backend has the one-tensor all-gather: asked once, with one number.

    A backend without it raises before sending anything, on every rank alike, and a one-number gather cannot
    fail for want of memory on one rank only; so the ranks agree, and a later failure of a real gather is
    raised, rather than switching one rank alone to another collective while the others wait in the first.
    """
    backend = dist.get_backend()
    if backend not in _PROBED:
        probe = torch.zeros(1, dtype=torch.int64, device=device)
        out = torch.empty(dist.get_world_size(), dtype=torch.int64, device=device)
        try:
            _GATHER_SINGLE(out, probe)
        except (RuntimeError, NotImplementedError) as exc:
            WITHOUT_SINGLE_GATHER[backend] = f"{type(exc).__name__}: {exc}"
        _PROBED[backend] = (probe, out)
    return backend not in WITHOUT_SINGLE_GATHER


def group_problem(group: Sequence[torch.nn.Parameter]) -> str | None:
    """Why a group's gradients cannot be gathered (missing, dense, or on different rows), or None."""
    for p in group:
        if p.grad is None or not p.grad.is_sparse:
            what = "no gradient" if p.grad is None else "a dense gradient"
            return (
                f"a lazy parameter of shape {tuple(p.shape)} has {what} after backward(); lazy Adam's parameters "
                f"need sparse gradients (the names given to Objective(sparse_grad=...))"
            )
    if not shares_rows([p.grad for p in group]):
        return f"the sparse gradients of the parameters of shapes {[tuple(p.shape) for p in group]} hold different rows"
    return None


def no_rows(group: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a failed rank sends for a group: no rows, and values of the group's width and dtype."""
    p = group[0]
    return (
        torch.empty(0, dtype=torch.int64, device=p.device),
        torch.empty((0, width(group)), dtype=p.dtype, device=p.device),
    )


def local_rows(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's gradients coalesced once: the distinct rows ``[R]`` and their values side by side ``[R, w]``.

    On CUDA a host-device sync (the number of distinct rows).
    """
    indices, values = coalesce_joined(grads[0]._indices(), joined_values(grads), grads[0].shape[0])
    return indices[0], values


def width(group: Sequence[torch.nn.Parameter]) -> int:
    """Values per row of a group's joined gradient (a bias adds 1)."""
    return sum(math.prod(p.shape[1:]) for p in group)


def gather_rows(
    local: list[tuple[torch.Tensor, torch.Tensor]],
    world_size: int,
    gather: Callable[[torch.Tensor, torch.Tensor], list] = all_gather_flat,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
    """Every rank's rows and values of each group, concatenated in rank order, and the tensors to hold.

    Parameters
    ----------
    local : list of (rows, values)
        This rank's coalesced rows ``[R_g]`` (int64) and values ``[R_g, w_g]`` per group, in the same group
        order, widths and dtype on every rank (a failed rank sends ``R_g = 0``).
    world_size : int
        ``W``.
    gather : callable
        ``gather(out, tensor)``: every rank's 1-D ``tensor`` into ``out``, returning the tensors handed to
        the backend (:func:`all_gather_flat`; a test passes its own).

    Returns
    -------
    gathered : list of (rows, values)
        Per group the ``W`` ranks' rows ``[sum_r R_g,r]`` and values ``[sum_r R_g,r, w_g]``.
    held : list of torch.Tensor
        What went to the collectives, for the caller to keep referenced (``gpu_ann.distributed``).
    """
    if not local:
        return [], []
    device, dtype = local[0][0].device, local[0][1].dtype
    if any(values.dtype != dtype for _, values in local):
        raise ValueError(f"the lazy tables' gradients must share one dtype, got {[v.dtype for _, v in local]}")
    G = len(local)
    # Built on the device from host integers (fills, no copy from host memory); the counts are known on the
    # host already (each coalesce learned its own).
    counts = torch.cat([torch.full((1,), rows.numel(), dtype=torch.int64, device=device) for rows, _ in local])
    all_counts = torch.empty(world_size * G, dtype=torch.int64, device=device)
    held = gather(all_counts, counts)
    flat = all_counts.tolist()  # host-device sync, the step's one: every rank's count of every group
    sizes = [flat[r * G : (r + 1) * G] for r in range(world_size)]  # sizes[r][g]
    longest = [max(s[g] for s in sizes) for g in range(G)]
    widths = [values.shape[1] for _, values in local]
    # This rank's rows and values of every group in two flat buffers, each group padded to its longest rank.
    row_at = [sum(longest[:g]) for g in range(G)]
    value_at = [sum(n * w for n, w in zip(longest[:g], widths[:g])) for g in range(G)]
    send_rows = torch.zeros(sum(longest), dtype=torch.int64, device=device)
    send_values = torch.zeros(sum(n * w for n, w in zip(longest, widths)), dtype=dtype, device=device)
    for g, (rows, values) in enumerate(local):
        send_rows[row_at[g] : row_at[g] + rows.numel()] = rows
        send_values[value_at[g] : value_at[g] + values.numel()] = values.reshape(-1)
    all_rows = torch.empty(world_size * send_rows.numel(), dtype=torch.int64, device=device)
    all_values = torch.empty(world_size * send_values.numel(), dtype=dtype, device=device)
    held += gather(all_rows, send_rows)
    held += gather(all_values, send_values)
    by_rank_rows = all_rows.view(world_size, -1)
    by_rank_values = all_values.view(world_size, -1)
    gathered = []
    for g in range(G):
        rows = [by_rank_rows[r, row_at[g] : row_at[g] + sizes[r][g]] for r in range(world_size)]
        values = [by_rank_values[r, value_at[g] : value_at[g] + sizes[r][g] * widths[g]] for r in range(world_size)]
        gathered.append((torch.cat(rows), torch.cat(values).view(-1, widths[g])))
    return gathered, held


def merged_gradients(
    rows: torch.Tensor, values: torch.Tensor, world_size: int, group: Sequence[torch.nn.Parameter]
) -> list[torch.Tensor]:
    """The group's mean gradient over the ranks from their gathered rows: coalesced, one per parameter.

    The values are divided by ``W`` first and the repeats then summed, as RowAdam's coalesce summed them
    when it received the concatenation (on CUDA a host-device sync: the number of distinct rows).
    """
    indices, summed = coalesce_joined(rows.unsqueeze(0), values.div_(world_size), group[0].shape[0])
    return split_joined(indices, summed, list(group))
