"""Data-parallel training under ``torchrun``: the process group, gradient averaging and replica checks.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them (or with ``WORLD_SIZE=1``) :class:`Replicas` is a single process and every method is a no-op. Every
rank builds the same model from the same seed and averages its gradients with the others after each
backward pass (one all-reduce of all gradients flattened into one buffer), so the replicas stay
bit-identical without ever broadcasting weights. Only rank 0 evaluates, logs and writes checkpoints; the
others learn whether to stop from it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def tensor_digest(tensor: torch.Tensor) -> int:
    """A 64-bit BLAKE2b hash of a tensor's bytes, as a signed integer (fits an int64 tensor).

    Any change of any bit changes it (up to a 2**-64 chance), unlike a sum, which changes compensating in
    opposite directions leave alone.

    Parameters
    ----------
    tensor : torch.Tensor
        Any dtype and device; it is copied to the host (on a GPU, a host-device sync).

    Returns
    -------
    int
    """
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


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
    device : torch.device
        Where the collectives' own tensors live (this rank's GPU under NCCL, the CPU under gloo).
    """

    def __init__(self, backend_name: str, environ=None) -> None:
        env = os.environ if environ is None else environ
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        # Where the collectives' small tensors live: NCCL takes this rank's GPU, gloo host memory.
        self.device = torch.device("cuda", self.local_rank) if backend_name == "cuda" else torch.device("cpu")
        self._owns_group = False
        self._gradient_buffer: torch.Tensor | None = None
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

    @property
    def gradient_buffer(self) -> torch.Tensor | None:
        """The flat buffer :meth:`average_gradients` all-reduces in: made at its first call, then reused."""
        return self._gradient_buffer

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks (one all-reduce; waits for the other ranks).

        The gradients are copied into one flat buffer, all-reduced there and copied back. The buffer is made
        at the first call and reused by every later one, so a step allocates nothing here.

        Parameters
        ----------
        parameters : iterable of torch.nn.Parameter
            The model's parameters, after ``backward()``; each must have a gradient, and every call must
            pass the same parameters.

        Raises
        ------
        ValueError
            The parameters hold more or fewer elements than at the first call.
        """
        if not self.distributed:
            return
        grads = [p.grad for p in parameters]
        flat = self._gradient_buffer
        if flat is None:
            flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
            self._gradient_buffer = flat
        sizes = [g.numel() for g in grads]
        if sum(sizes) != flat.numel():
            raise ValueError(f"the gradients hold {sum(sizes)} elements, the all-reduce buffer {flat.numel()}")
        parts = flat.split(sizes)
        for part, g in zip(parts, grads):
            part.copy_(g.reshape(-1))
        dist.all_reduce(flat)  # sums over the ranks; every rank gets the same bits back
        flat /= self.world_size  # in place
        for part, g in zip(parts, grads):
            g.copy_(part.view_as(g))

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

        Compares a hash of each parameter's bytes (:func:`tensor_digest`) across the ranks: every parameter
        is copied to the host (a host-device sync), then one all-gather. A check for tests and debugging
        runs (``--replica-check-every``), not for every step of a long one.

        Parameters
        ----------
        parameters : iterable of torch.nn.Parameter
            The model's parameters.
        step : int
            For the message.
        """
        if not self.distributed:
            return
        params = list(parameters)
        mine = [tensor_digest(p) for p in params]
        digests = torch.tensor(mine, dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(digests) for _ in range(self.world_size)]
        dist.all_gather(gathered, digests)
        for r, other in enumerate(gathered):
            differ = [i for i, (a, b) in enumerate(zip(mine, other.tolist())) if a != b]  # host-device sync
            if differ:
                i = differ[0]
                also = f", and {len(differ) - 1} more" if len(differ) > 1 else ""
                raise ReplicasDiverged(
                    f"after step {step} the weights of rank {r} differ from rank {self.rank}'s (parameter {i} "
                    f"of {len(params)}, shape {tuple(params[i].shape)}{also})"
                )

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. "stop training"); waits for rank 0.

        Parameters
        ----------
        flag : bool
            The decision; only rank 0's counts.

        Returns
        -------
        bool
        """
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())  # host-device sync

    def close(self) -> None:
        """Leave the process group this object joined (a no-op otherwise)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
