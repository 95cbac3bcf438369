"""Data-parallel training under ``torchrun``: the process group, gradient averaging and replica checks.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them (or with ``WORLD_SIZE=1``) :class:`Replicas` is a single process and every method is a no-op. Every
rank builds the same model from the same seed and averages its gradients with the others after each
backward pass (one all-reduce of all gradients flattened into one buffer), so the replicas stay
bit-identical without ever broadcasting weights. Only rank 0 evaluates, logs and writes checkpoints; the
others learn whether to stop from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


class ReplicasDiverged(RuntimeError):
    """The ranks' weights differ after a step (they must stay identical)."""


class Replicas:
    """This process's place in a data-parallel run, read from the ``torchrun`` environment.

    Parameters
    ----------
    backend_name : {"cpu", "cuda"}
        The compute backend: NCCL joins CUDA ranks, gloo CPU ranks.
    environ : mapping, optional
        Where to read ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (default ``os.environ``).

    Attributes
    ----------
    rank, local_rank, world_size : int
        0, 0, 1 outside ``torchrun``.
    """

    def __init__(self, backend_name: str, environ=None) -> None:
        env = os.environ if environ is None else environ
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self._owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            # Rendezvous (MASTER_ADDR / MASTER_PORT or torchrun's --rdzv-* flags) comes from the environment.
            dist.init_process_group("nccl" if backend_name == "cuda" else "gloo")
            self._owns_group = True

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, logs and writes."""
        return self.rank == 0

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks (one all-reduce; waits for the other ranks).

        Parameters
        ----------
        parameters : iterable of torch.nn.Parameter
            The model's parameters, after ``backward()``; each must have a gradient.
        """
        if not self.distributed:
            return
        grads = [p.grad for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # sums over the ranks; every rank gets the same bits back
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_sum(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its sum over the ranks, in place (waits for the other ranks).

        Parameters
        ----------
        tensor : torch.Tensor
            On the process group's device.
        """
        if self.distributed:
            dist.all_reduce(tensor)

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every rank's ``tensors`` with rank 0's, in place (waits for rank 0).

        Parameters
        ----------
        tensors : iterable of torch.Tensor
            The same shapes and order on every rank, e.g. ``model.state_dict().values()``.
        """
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    def check_identical(self, parameters: Iterable[torch.nn.Parameter], step: int) -> None:
        """Raise :class:`ReplicasDiverged` unless every rank holds bit-identical parameters.

        Compares a checksum of each parameter's bits (int32 view, summed in int64) across ranks: one
        all-gather, and a host-device sync.

        Parameters
        ----------
        parameters : iterable of torch.nn.Parameter
            The model's parameters.
        step : int
            For the message.
        """
        if not self.distributed:
            return
        sums = torch.stack([p.detach().contiguous().view(torch.int32).sum(dtype=torch.int64) for p in parameters])
        gathered = [torch.empty_like(sums) for _ in range(self.world_size)]
        dist.all_gather(gathered, sums)
        for r, other in enumerate(gathered):
            if not torch.equal(other, sums):  # host-device sync
                raise ReplicasDiverged(f"after step {step} the weights of rank {r} differ from rank {self.rank}'s")

    def agree(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. "stop training"); waits for rank 0.

        Parameters
        ----------
        flag : bool
            The decision; only rank 0's counts.
        device : torch.device
            Where the collective's tensor lives (the process group's device).

        Returns
        -------
        bool
        """
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())  # host-device sync

    def close(self) -> None:
        """Leave the process group this object joined (a no-op otherwise)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
