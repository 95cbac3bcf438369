"""Adam with lazy updates of the item tables: the rows a step touched, not all ``n_items`` of them.

On the sparse input path a batch reads a few thousand rows of the first layer's item table, and with the
sampled softmax it reads ``B + k`` rows of the output layer; yet a dense gradient and dense Adam touch all
``n_items`` rows of both, with their two moments, every step. At 10**6 items that was 0.76-0.89 s of a
1.05 s step on the 2-core CPU machine (``bench/README.md``).

``LazyAdam`` keeps plain Adam (``torch.optim.Adam``) for the dense layers and :class:`RowAdam` for the
tables whose gradients arrive sparse (``embedding_bag(sparse=True)``, :func:`gpu_ann.sampled.gather_rows`).
RowAdam is ``torch.optim.SparseAdam``'s update (the "lazy Adam" of TensorFlow Addons), bit for bit: a row
and its moments change only in the steps whose gradient holds that row. It computes it with row gathers
and adds (``index_select``, ``index_add_``) where SparseAdam builds sparse tensors and masks the dense
moments with them: at 10**6 items its step took 21-28 ms where SparseAdam's took 40-91 ms
(``bench/test_optimizer_step.py``, ``bench/README.md``).

Lazy Adam is a different optimiser from Adam, not a faster version of it: under dense Adam a row the batch
did not touch still moves (its first moment decays but is not zero), under lazy Adam it stays where it is.
When every row appears in every step the two agree up to where ``eps`` sits (SparseAdam adds it to
``sqrt(v)`` before the bias correction); the tests hold it to both facts. The bias correction counts the
table's steps, not the row's: a row first touched at a late step ``t`` has ``m = (1 - b1) g`` and
``v = (1 - b2) g**2`` with corrections near 1, so its first move is about ``lr (1 - b1) / sqrt(1 - b2)``, 3.2 lr at the
default betas, where Adam's first step of a parameter is lr (TensorFlow's LazyAdam does the same). Rare
items of a large catalogue meet exactly that case.

Each sparse gradient is coalesced (its rows sorted and repeats merged) before RowAdam reads it, and on the
GPU the number of distinct rows that finds decides the size of what follows: a host-device sync. The output
layer's weight and bias share the rows of one gather, so they are coalesced together
(:mod:`gpu_ann.sparse_rows`). A step therefore syncs once per row group: once with one lazy table, twice
with both (the first layer's item table on the sparse path, the output layer with the sampled softmax).
Under torchrun ``gpu_ann.sparse_gather`` coalesces each group on its rank and again once gathered, and reads
every group's row counts in one go: ``2 x groups + 1`` syncs a step (5 with both), and RowAdam finds them
coalesced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from gpu_ann.sparse_rows import coalesce_together, row_groups, shares_rows

OPTIMIZERS = ("auto", "adam", "lazy-adam")


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for parameters with sparse gradients: SparseAdam's update, on the gradient's rows only.

    For a step ``t`` of the parameter (counted per parameter, as SparseAdam does) and the coalesced
    gradient ``g`` of rows ``R``: ``m_R = b1 m_R + (1 - b1) g``, ``v_R = b2 v_R + (1 - b2) g**2``, then
    ``p_R -= lr sqrt(1 - b2**t) / (1 - b1**t) * m_R / (sqrt(v_R) + eps)``; every other row of ``p``, ``m``
    and ``v`` is left as it is. The state (``step``, ``exp_avg``, ``exp_avg_sq``) is SparseAdam's.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        Parameters whose gradients are sparse COO tensors (rows along dimension 0).
    lr : float
        Learning rate.
    betas : tuple of two floats
        Decays of the first and second moments.
    eps : float
        Added to the square root of the second moment.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient.

        Raises
        ------
        RuntimeError
            A parameter's gradient is dense.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse or p.grad.sparse_dim() != 1:
                    kind = "a dense one" if not p.grad.is_sparse else f"sparse_dim {p.grad.sparse_dim()}"
                    raise RuntimeError(
                        f"RowAdam needs row-sparse gradients (sparse_dim 1); a parameter of shape {tuple(p.shape)} "
                        f"has {kind}"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1  # as SparseAdam: every step with a gradient, even an empty one
                # Repeated rows summed. On CUDA a host-device sync (how many rows), unless the gradient comes
                # coalesced already (LazyAdam.step, gpu_ann.sparse_gather): then this returns it as it is.
                grad = p.grad.coalesce()
                rows, g = grad.indices()[0], grad.values()
                if rows.numel() == 0:
                    continue
                t = state["step"]
                # SparseAdam's arithmetic in its order, so that the two agree bit for bit: each moment moves
                # by an update (g - m)(1 - b1), (g**2 - v)(1 - b2) added to its rows, and the step reuses
                # the updates plus the old rows rather than reading the moments back.
                m_old = state["exp_avg"].index_select(0, rows)
                v_old = state["exp_avg_sq"].index_select(0, rows)
                m_update = g.sub(m_old).mul_(1 - b1)
                v_update = g.pow(2).sub_(v_old).mul_(1 - b2)
                # The rows are distinct after coalescing, so each add touches a row once (deterministic on CUDA).
                state["exp_avg"].index_add_(0, rows, m_update)
                state["exp_avg_sq"].index_add_(0, rows, v_update)
                m_new = m_update.add_(m_old)
                del m_old
                denominator = v_update.add_(v_old).sqrt_().add_(eps)
                del v_old
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.index_add_(0, rows, -step_size * m_new.div_(denominator))
        return loss


class LazyAdam:
    """Adam for dense parameters and :class:`RowAdam` for those with sparse gradients, stepped as one optimiser.

    Parameters
    ----------
    named_parameters : iterable of (str, torch.nn.Parameter)
        The model's parameters with their names (``model.named_parameters()``).
    lazy : iterable of str
        Names of the parameters whose gradients are sparse; every one must be among ``named_parameters``.
    lr : float
        Learning rate of both.
    betas : tuple of two floats
        Adam's moment decays, for both.
    eps : float
        Added to the square root of the second moment, for both.

    Raises
    ------
    ValueError
        A name in ``lazy`` that is not a parameter, or no lazy parameter at all.

    Notes
    -----
    After ``backward()`` every lazy parameter must hold a sparse gradient (or none) and every other one a
    dense gradient (or none); ``step`` raises otherwise (RowAdam refuses a dense gradient).
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        lazy: Iterable[str],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        named = dict(named_parameters)
        lazy = tuple(lazy)
        unknown = [name for name in lazy if name not in named]
        if unknown:
            raise ValueError(f"lazy parameters {unknown} are not among the model's {list(named)}")
        if not lazy:
            raise ValueError("LazyAdam needs at least one lazy parameter (use torch.optim.Adam otherwise)")
        self.lazy_names = lazy
        # Parameters whose gradients share one index tensor are coalesced together (one sort, not two).
        self._row_groups = [tuple(named[n] for n in group) for group in row_groups(lazy)]
        dense = [p for n, p in named.items() if n not in lazy]
        # torch's optimisers refuse an empty parameter list: with every parameter lazy there is no Adam.
        self.dense = torch.optim.Adam(dense, lr=lr, betas=betas, eps=eps) if dense else None
        self.sparse = RowAdam([named[n] for n in lazy], lr=lr, betas=betas, eps=eps)
        self._parts = [o for o in (self.dense, self.sparse) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        """The dense optimiser's groups, then the sparse one's (``lr`` and the other settings of each)."""
        return [group for o in self._parts for group in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (``None`` by default, as ``torch.optim.Optimizer``)."""
        for o in self._parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One update: Adam on the dense parameters, RowAdam on the rows each sparse gradient holds."""
        for name, p in zip(self.lazy_names, self.sparse.param_groups[0]["params"]):
            if p.grad is not None and not p.grad.is_sparse:
                raise RuntimeError(
                    f"lazy parameter {name!r} has a dense gradient: the loss must give it a sparse one "
                    f"(pass the same names to Objective(sparse_grad=...) as to LazyAdam)"
                )
        # CUDA: one host-device sync per row group (coalescing learns how many rows there are): here for the
        # output layer's weight and bias together, in RowAdam for a table alone.
        for group in self._row_groups:
            grads = [p.grad for p in group]
            # Coalesced already under torchrun (gpu_ann.sparse_gather): nothing to do.
            if len(group) > 1 and shares_rows(grads) and not any(g.is_coalesced() for g in grads):
                for p, grad in zip(group, coalesce_together(grads)):
                    p.grad = grad
        for o in self._parts:
            o.step()

    def state_dict(self) -> dict:
        """Both optimisers' states, as ``{"dense": ..., "lazy": ..., "lazy_names": [...]}`` (``dense`` may be None)."""
        dense = None if self.dense is None else self.dense.state_dict()
        return {"dense": dense, "lazy": self.sparse.state_dict(), "lazy_names": list(self.lazy_names)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises
        ------
        ValueError
            ``state`` is not a ``LazyAdam`` state (e.g. plain Adam's) or names other lazy parameters.
        """
        if not isinstance(state, dict) or set(state) != {"dense", "lazy", "lazy_names"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not a lazy-adam optimiser state (keys {keys}): was the run trained with --optimizer adam?"
            )
        if list(state["lazy_names"]) != list(self.lazy_names):
            raise ValueError(
                f"the saved lazy-adam state updates {list(state['lazy_names'])} lazily, "
                f"this run {list(self.lazy_names)}"
            )
        if (state["dense"] is None) != (self.dense is None):
            raise ValueError("the saved lazy-adam state and this optimiser disagree on whether any parameter is dense")
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["lazy"])


def lazy_parameter_names(path: str, softmax: str) -> tuple[str, ...]:
    """The parameters whose gradients a step makes sparse for an input path and a softmax.

    Parameters
    ----------
    path : {"dense", "sparse"}
        The sparse path reads the first layer's item table with ``embedding_bag``; the dense path
        multiplies the whole table.
    softmax : {"full", "sampled"}
        The sampled softmax gathers the output layer's rows of the targets and the negatives; the full
        softmax computes every item's logit.

    Returns
    -------
    tuple of str
        Parameter names of :class:`~gpu_ann.model.CandidateGenerator`; empty when every gradient is dense.
    """
    names = ("embed.item_table",) if path == "sparse" else ()
    return names + (("out.weight", "out.bias") if softmax == "sampled" else ())


def lazy_tables(
    optimizer: str,
    path: str,
    softmax: str,
    n_items: int,
    batch_size: int,
    mean_bag_length: float,
    negatives: int = 0,
    compile: bool = False,
    world_size: int = 1,
) -> tuple[str, ...]:
    """The parameters a run updates lazily, for ``--optimizer`` and the run's sizes.

    ``"adam"``: none. ``"lazy-adam"``: every table :func:`lazy_parameter_names` names. ``"auto"`` (the
    default): each of those tables whose sparse gradient has fewer rows than the table itself, the rows a
    step reads on all ``W = world_size`` ranks together: the first layer's item table when
    ``W * batch_size * mean_bag_length < n_items`` (one row per bag entry), the output layer when
    ``W * (batch_size + negatives) < n_items``; none under ``compile``, which cannot trace sparse gradients.
    Fewer rows than the table is where the sparse gradient is the smaller one and lazy Adam touches less
    than Adam would: measured on the 2-core CPU machine, at 17,500 items and batch 1,024 (about 250,000 bag
    entries) lazy Adam on the item table made the step 2.8x slower, on the output layer alone (2,048 rows)
    1.18x faster, and at 10**6 items and batch 256 on both tables 17.8x faster (``bench/README.md``).

    Under ``torchrun`` every rank's rows count: each rank sends its own (the negatives too, though every
    rank draws the same), the all-gather moves about ``W R (4 d + 8)`` bytes to each rank where the ring
    all-reduce of the dense gradient moves about ``2 n d 4``, and RowAdam then steps on all ``W R`` rows
    (the planner counts ``min(W R, n)`` of them). Every rank gets the same answer from the same sizes.

    Parameters
    ----------
    optimizer : {"auto", "adam", "lazy-adam"}
        The choice.
    path, softmax : str
        The run's input path (``"dense"`` / ``"sparse"``) and softmax (``"full"`` / ``"sampled"``).
    n_items : int
        Rows of each item table.
    batch_size : int
        Samples per step.
    mean_bag_length : float
        Expected bag length of a training sample (``gpu_ann.path_cost.row_statistics``).
    negatives : int
        Sampled negatives per step (with the sampled softmax).
    compile : bool
        The loss is compiled with ``torch.compile``.
    world_size : int
        Ranks of a ``torchrun`` run (1 outside one), each with a batch of ``batch_size``.

    Returns
    -------
    tuple of str
        Parameter names, empty for plain Adam.

    Raises
    ------
    ValueError
        An unknown ``optimizer``, or ``world_size`` below 1.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    names = lazy_parameter_names(path, softmax)
    if optimizer == "lazy-adam":
        return names
    if optimizer == "adam" or compile:
        return ()
    chosen = ()
    if "embed.item_table" in names and world_size * batch_size * mean_bag_length < n_items:
        chosen += ("embed.item_table",)
    if "out.weight" in names and world_size * (batch_size + negatives) < n_items:
        chosen += ("out.weight", "out.bias")
    return chosen
