"""Data-parallel training under ``torchrun``: the process group, gradient averaging and replica checks.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them (or with ``WORLD_SIZE=1``) :class:`Replicas` is a single process and every method is a no-op. Every
rank builds the same model from the same seed and averages its gradients with the others after each
backward pass (one all-reduce of all dense gradients flattened into one buffer; sparse ones, lazy Adam's,
all-gathered), so the replicas stay bit-identical without ever broadcasting weights. Only rank 0
evaluates, logs and writes checkpoints; the others learn whether to stop from it.

An error on one rank must not leave the others waiting in a collective it will never join. Under
``torchrun`` the trainer runs each rank's own work through :meth:`Replicas.attempt`, which keeps an error
instead of raising it: the failed rank skips its work from then on but still joins every collective, and
the next *check* (:meth:`~Replicas.settle`, :meth:`~Replicas.all_sum`, :meth:`~Replicas.agree`,
:meth:`~Replicas.check_identical`) carries each rank's failure flag, so every rank raises there: the failed
one its own error, the others :class:`RankFailed`. The checks already read their result on the host, so
the flags cost no extra synchronisation; between checks a failed rank adds zeros to the gradient all-reduce,
and nothing is written from those steps (rank 0 writes only after an evaluation's check).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from gpu_ann import sparse_gather

log = logging.getLogger("gpu_ann.distributed")

# The tensors of the last few collectives, referenced from here until the interpreter tears the module down.
# gloo's worker thread drops its own reference to a finished collective's tensors a moment after the caller
# has moved on; when that is the last reference, torch takes the GIL to free the tensor's Python object, and
# if the interpreter is already shutting down the thread is ended mid-destructor and the process aborts
# ("terminate called without an active exception", seen about once in 30 two-rank runs, at exit after the
# last evaluation: the core showed ProcessGroupGloo::runLoop freeing an all-reduce's work during
# Py_FinalizeEx's garbage collection). Held here, the worker's release never frees them. Lazy Adam's gathers
# are held by their Replicas instead, one step's at a time (see Replicas._average_sparse), and handed over
# here, as one entry, when it closes.
_RECENT_COLLECTIVE_TENSORS: collections.deque = collections.deque(maxlen=16)


def _hold(*tensors: torch.Tensor) -> None:
    """Keep ``tensors``, just handed to a collective, referenced past the gloo worker's release (see above)."""
    _RECENT_COLLECTIVE_TENSORS.extend(tensors)


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


class RankFailed(RuntimeError):
    """Another rank raised an error; this one stops at the same check (that rank's output has the error)."""


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
    failure : Exception or None
        The error :meth:`attempt` kept on this rank, raised again at the next check.
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
        # The tensors of the last step's sparse gathers (_average_sparse): held past the gloo worker's release,
        # as _hold does for the others, but by this run alone, and replaced each step.
        self._last_sparse_gathers: list | None = None
        self.failure: Exception | None = None
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

    @contextlib.contextmanager
    def keeping_errors(self) -> Iterator[None]:
        """Under ``torchrun``, keep an exception raised in the block as :attr:`failure` instead of raising it.

        The rank then goes on to the next check, where every rank raises. In one process the exception
        propagates as usual. The block runs even after a failure: use :meth:`attempt` to skip work.
        """
        if not self.distributed:
            yield
            return
        try:
            yield
        except Exception as exc:
            self._keep(exc)

    def _keep(self, exc: Exception) -> None:
        if self.failure is None:  # the first error is the one to report
            self.failure = exc
            log.error("rank %d: %s: %s (every rank stops at the next check)", self.rank, type(exc).__name__, exc)

    def attempt(self, fn: Callable, *args):
        """``fn(*args)``; under ``torchrun`` an error is kept for the next check, and after one ``fn`` is skipped.

        Parameters
        ----------
        fn : callable
            This rank's own work (no collectives inside, or only ones every rank reaches in any case).
        *args
            Its arguments.

        Returns
        -------
        object
            What ``fn`` returns, or None when it failed or was skipped (a failed rank joins the collectives
            without working until the next check raises).
        """
        if self.failure is not None:
            return None
        with self.keeping_errors():
            return fn(*args)
        return None  # the error was kept

    def settle(self, what: str = "") -> None:
        """Raise on every rank when any rank has failed (one all-reduce of the flags, a host-device sync).

        Parameters
        ----------
        what : str
            Where, for the others' :class:`RankFailed` message (e.g. ``" in its memory plan"``).

        Raises
        ------
        Exception
            On the failed rank, its own error; on the others :class:`RankFailed`.
        """
        if self.distributed:
            self._sum_with_flags(torch.zeros(0, dtype=torch.float64, device=self.device), what)

    def _sum_with_flags(self, values: torch.Tensor, what: str = "") -> torch.Tensor:
        """``values`` (1-D) summed over the ranks, with one failure flag per rank beside them; raises if set."""
        flags = torch.zeros(self.world_size, dtype=values.dtype, device=values.device)
        flags[self.rank] = self.failure is not None
        joined = torch.cat([values, flags])
        _hold(joined)
        dist.all_reduce(joined)
        self._raise_if_failed(joined[len(values) :].tolist(), what)  # host-device sync
        return joined[: len(values)]

    def _raise_if_failed(self, flags: list, what: str = "") -> None:
        failed = [r for r, flag in enumerate(flags) if flag]
        if not failed:
            return
        if self.failure is not None:
            raise self.failure
        ranks = ", ".join(map(str, failed))
        raise RankFailed(
            f"rank {ranks} stopped with an error{what}; rank {self.rank} stops too (rank {ranks}'s output has it)"
        )

    @property
    def gradient_buffer(self) -> torch.Tensor | None:
        """The flat buffer :meth:`average_gradients` all-reduces in: made at its first call, then reused."""
        return self._gradient_buffer

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter], sparse: Iterable = ()) -> None:
        """Replace every gradient by its mean over the ranks (one all-reduce; waits for the other ranks).

        The dense gradients are copied into one flat buffer, all-reduced there and copied back. The buffer
        is made at the first call and reused by every later one, so a step allocates nothing here. Sparse
        gradients (lazy Adam's item tables) are gathered instead, all of them in three collectives and one
        read of their row counts (:mod:`gpu_ann.sparse_gather`).

        Parameters
        ----------
        parameters : iterable of torch.nn.Parameter
            The model's parameters, after ``backward()``; each must have a gradient, and every call must
            pass the same parameters.
        sparse : iterable of torch.nn.Parameter or of tuples of them
            Those of ``parameters`` whose gradients are sparse COO tensors (the same on every rank and call).
            A tuple is a row group: parameters whose gradients share one index tensor (the output layer's
            weight and bias, :func:`gpu_ann.sparse_rows.row_groups`), gathered and coalesced as one.

        Raises
        ------
        ValueError
            The dense parameters hold more or fewer elements than at the first call.
        """
        if not self.distributed:
            return
        groups = [(s,) if isinstance(s, torch.Tensor) else tuple(s) for s in sparse]
        lazy = {id(p) for group in groups for p in group}
        params = [p for p in parameters if id(p) not in lazy]
        sizes = [p.numel() for p in params]
        flat = self._gradient_buffer
        if flat is None:
            flat = torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
            self._gradient_buffer = flat
        if sum(sizes) != flat.numel():
            raise ValueError(f"the parameters hold {sum(sizes)} elements, the all-reduce buffer {flat.numel()}")
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            self._keep(ValueError(f"parameter {missing[0]} of {len(params)} has no gradient after backward()"))
        parts = flat.split(sizes)
        if self.failure is not None:
            flat.zero_()  # a failed rank adds nothing, but joins the all-reduce the others wait in
        else:
            for part, p in zip(parts, params):
                part.copy_(p.grad.reshape(-1))
        _hold(flat)
        dist.all_reduce(flat)  # sums over the ranks; every rank gets the same bits back
        flat /= self.world_size  # in place
        if self.failure is None:
            for part, p in zip(parts, params):
                p.grad.copy_(part.view_as(p.grad))
        if groups:
            self._average_sparse(groups)

    def _average_sparse(self, groups: list[tuple]) -> None:
        """Replace each group's sparse gradients by their mean over the ranks: every rank's rows, gathered.

        See :mod:`gpu_ann.sparse_gather`: on CUDA at most ``2 x len(groups) + 1`` host-device syncs. A failed rank,
        or one whose gradients are missing, dense or (in a group) on different rows, sends no rows and keeps
        its gradients; the next check raises everywhere.
        """
        for group in groups if self.failure is None else ():
            # Kept, not raised: this rank still joins the gathers (sending no rows), so the others do not wait
            # for it; the next check raises everywhere.
            problem = sparse_gather.group_problem(group)
            if problem is not None:
                self._keep(ValueError(problem))
        if self.failure is None:
            local = [sparse_gather.local_rows([p.grad for p in group]) for group in groups]
        else:
            local = [sparse_gather.no_rows(group) for group in groups]
        # The previous step's gathers, held until now (below), are released before this step's are made, so
        # only one step's are alive at a time (the planner counts them: gradient_buffer).
        self._last_sparse_gathers = None
        gathered, held = sparse_gather.gather_rows(local, self.world_size)
        # Held past the gloo worker's release, as _hold does for the others: a worker whose last work was one of
        # these gathers drops it at shutdown, and must not be the one that frees them (the gloo abort above,
        # seen once in a two-rank lazy-adam run in CI on 2026-12-04). close() hands them to the module's hold.
        self._last_sparse_gathers = held
        if self.failure is None:
            for group, (rows, values) in zip(groups, gathered):
                for p, grad in zip(group, sparse_gather.merged_gradients(rows, values, self.world_size, group)):
                    p.grad = grad

    def all_sum(self, tensor: torch.Tensor, what: str = "") -> None:
        """Replace ``tensor`` by its sum over the ranks, in place (waits for the other ranks).

        A check: the failure flags travel with it, and it raises on every rank when any rank has failed
        (a host-device sync).

        Parameters
        ----------
        tensor : torch.Tensor
            1-D, on :attr:`device`.
        what : str
            Where, for the others' :class:`RankFailed` message (e.g. ``" by step 10"``).

        Raises
        ------
        RankFailed
            Another rank has failed (a failed rank raises its own error).
        """
        if self.distributed:
            tensor.copy_(self._sum_with_flags(tensor, what))

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every rank's ``tensors`` with rank 0's, in place (waits for rank 0).

        Parameters
        ----------
        tensors : iterable of torch.Tensor
            The same shapes and order on every rank, e.g. ``model.state_dict().values()``.
        """
        if self.distributed:
            for t in tensors:
                _hold(t)
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
            For the messages.

        Raises
        ------
        ReplicasDiverged
            The weights differ.
        RankFailed
            Another rank has failed (a check; a failed rank raises its own error).
        """
        if not self.distributed:
            return
        params = list(parameters)
        # A failed rank sends zeros of the same length (all_gather needs it) and its flag, last.
        mine = self.attempt(lambda: [tensor_digest(p) for p in params]) or [0] * len(params)
        sent = torch.tensor([*mine, int(self.failure is not None)], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(sent) for _ in range(self.world_size)]
        _hold(sent, *gathered)
        dist.all_gather(gathered, sent)
        received = [g.tolist() for g in gathered]  # host-device sync
        self._raise_if_failed([r[-1] for r in received], f" by step {step}")
        for r, other in enumerate(received):
            differ = [i for i, (a, b) in enumerate(zip(mine, other[:-1])) if a != b]
            if differ:
                i = differ[0]
                also = f", and {len(differ) - 1} more" if len(differ) > 1 else ""
                raise ReplicasDiverged(
                    f"after step {step} the weights of rank {r} differ from rank {self.rank}'s (parameter {i} "
                    f"of {len(params)}, shape {tuple(params[i].shape)}{also})"
                )

    def agree(self, flag: bool, what: str = "") -> bool:
        """Rank 0's ``flag`` on every rank (e.g. "stop training"); waits for rank 0.

        A check: one all-reduce of rank 0's flag and every rank's failure flag.

        Parameters
        ----------
        flag : bool
            The decision; only rank 0's counts (None counts as False).
        what : str
            Where, for the others' :class:`RankFailed` message.

        Returns
        -------
        bool

        Raises
        ------
        RankFailed
            Another rank has failed (a failed rank raises its own error).
        """
        if not self.distributed:
            return bool(flag)
        decision = torch.tensor([float(bool(flag) and self.is_main)], dtype=torch.float64, device=self.device)
        return bool(self._sum_with_flags(decision, what)[0].item())  # host-device sync (already one above)

    def close(self) -> None:
        """Leave the process group this object joined (a no-op otherwise), and let go of the last sparse gathers.

        Those go to the module's bounded hold (:data:`_RECENT_COLLECTIVE_TENSORS`), as one entry: a gloo worker
        may still release them, so they stay referenced until the interpreter exits or, in a process that
        trains again, until later collectives take their place.
        """
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
        if self._last_sparse_gathers is not None:
            _RECENT_COLLECTIVE_TENSORS.append(tuple(self._last_sparse_gathers))
            self._last_sparse_gathers = None
