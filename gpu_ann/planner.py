"""Memory planner: estimate a training run's device bytes and refuse, before allocating, what cannot fit.

:func:`estimate` adds up what a run holds on its device for the given sizes and choices; :func:`check`
compares that with a budget (:func:`gpu_ann.memory_budget.device_budget`, or a user's limit) and raises
:class:`MemoryBudgetExceeded` with the estimate, the limit and the settings that would fit.

What is counted (fp32 master weights; ``P`` parameters, ``B`` batch rows, ``n`` items, ``k`` negatives,
``W`` ranks)::

    csr            indptr (n_users + 1) x int64, indices nnz x int32 (+ nnz x float32 values)
    samples        every training (user, item) int32 pair (each rank holds all of them unless users are
                   sharded) + this rank's int64 epoch order (its share); evaluation sets 16 bytes a sample
    sampler        sampled softmax: the alias table (float64 + int64) and log Q (float32), n each
    batch          dense: X [B, n + 3] in the batch dtype + y int64; sparse: B x max_row_length bag
                   indices (int64) and weights (float32), offsets, features [B, 3], y
    parameters     P x 4;  gradients  P x 4;  optimizer  Adam: 2 P x 4 (SGD: 0)
                   lazy Adam: the item tables' gradients are sparse, R rows of d values and an int64
                   index each: one row per bag entry of the first layer's (sparse path; B x the mean bag
                   length of a sample, at most B x max_row_length), B + k of the output layer's weight
                   and bias (sampled softmax); the moments stay dense, 2 P x 4
    gradient_buffer  torchrun (W > 1): the flat P x 4 buffer the gradients are all-reduced in; lazy Adam:
                   the dense ones only, and every rank's sparse rows gathered, 2 W R (d x 4 + 8)
    optimizer_step Adam's temporaries: on CUDA (foreach) one tensor of P; on the CPU 2 x the largest;
                   lazy Adam: those of the dense parameters, or for the largest sparse table its coalesced
                   gradient and RowAdam's four U x d arrays, if larger (U = min(W R, n) distinct rows:
                   under torchrun the step sees every rank's rows)
    activations    saved hidden layers and their gradients, 2 B (h0 + 2 h1 + 2 h2) x 4; sparse: + 24 B L
    logits         full: 3 B n x 4 (logits, log-softmax, gradient); sampled: 3 B (k + 1) x 4, the mask,
                   and the gathered output rows and their gradient, 2 (B + k) h2 x 4; bf16 on CUDA: + the
                   bf16 logits' block, B n x 2 (sampled: B k x 2), which the caching allocator keeps
    autocast       bf16: the bf16 copies autocast makes of the weights a matmul reads (all but the sparse
                   path's item table; the sampled softmax reads k output rows, not n), 2 bytes each, and
                   the bf16 gradient of the largest (bf16 activations are still counted at 4 bytes)
    evaluation     full-softmax evaluation without autograd: 2 B_eval n x 4 plus hidden layers; bf16: + the
                   weight copies (and on CUDA the bf16 logits' block, B_eval n x 2)

The persistent terms are held for the whole run; the step's transients (activations + logits + autocast),
the optimiser step and evaluation happen one after another, so the total counts only the largest of the
three. Bytes outside torch's and CuPy's allocations (the CUDA context, about 0.5 GiB, or on the CPU the
interpreter and the host copy of the data) are not counted: leave headroom in the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from gpu_ann.optim import lazy_tables

_LABELS = {
    "csr": "training matrix (CSR)",
    "samples": "sample arrays",
    "sampler": "negative sampler tables",
    "batch": "batch buffers",
    "parameters": "model parameters",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "gradient_buffer": "gradient all-reduce buffer",
    "optimizer_step": "optimizer step temporaries",
    "activations": "activations",
    "logits": "logits, softmax and their gradients",
    "autocast": "bf16 weight copies",
    "evaluation": "evaluation logits (full softmax)",
}


class MemoryBudgetExceeded(ValueError):
    """The run's estimated memory exceeds the budget: a ``ValueError``, since the settings (batch size,
    input path, softmax) do not fit the machine, and it is raised before anything is allocated. The
    message gives the estimate, its largest terms, the limit and the settings that would fit."""


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated device bytes of a training run, term by term (see the module docstring).

    Parameters
    ----------
    csr, samples, sampler, batch, parameters, gradients, optimizer : int
        Bytes held for the whole run.
    optimizer_step, activations, logits, evaluation : int
        Bytes of the transients: the optimiser step's; a training step's (activations + logits +
        ``autocast``); an evaluation batch's.
    gradient_buffer : int
        Bytes held for the whole run by the gradient all-reduce under ``torchrun`` (0 in one process).
    autocast : int
        Bytes of a bf16 training step's weight copies and the gradient of the largest (0 in fp32).
    settings : dict
        The arguments :func:`estimate` was called with, so that :func:`check` can try other settings.
    """

    csr: int
    samples: int
    sampler: int
    batch: int
    parameters: int
    gradients: int
    optimizer: int
    optimizer_step: int
    activations: int
    logits: int
    evaluation: int
    gradient_buffer: int = 0
    autocast: int = 0
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def persistent(self) -> int:
        """Bytes held for the whole run."""
        held = self.csr + self.samples + self.sampler + self.batch + self.parameters + self.gradients
        return held + self.optimizer + self.gradient_buffer

    @property
    def total(self) -> int:
        """Estimated peak: the persistent bytes plus the largest of the three transients."""
        step = self.activations + self.logits + self.autocast
        return self.persistent + max(step, self.optimizer_step, self.evaluation)

    def terms(self) -> dict[str, int]:
        """Every term by name, in bytes (the dataclass fields without ``settings``).

        Returns
        -------
        dict of str to int
        """
        return {name: value for name, value in asdict(self).items() if name != "settings"}

    def largest(self, count: int = 3) -> list[tuple[str, int]]:
        """The ``count`` largest terms as ``(label, bytes)``, largest first.

        Parameters
        ----------
        count : int
            How many terms.

        Returns
        -------
        list of (str, int)
        """
        ranked = sorted(self.terms().items(), key=lambda kv: -kv[1])
        return [(_LABELS[name], value) for name, value in ranked[:count] if value > 0]

    def summary(self) -> str:
        """A table of the terms (human-readable sizes) and the total, one per line.

        Returns
        -------
        str
        """
        lines = [f"{_LABELS[name]:<40}{format_bytes(value):>12}" for name, value in self.terms().items()]
        lines.append(f"{'total (persistent + largest transient)':<40}{format_bytes(self.total):>12}")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, three significant figures or so (``"1.50 GiB"``, ``"512 B"``).

    Parameters
    ----------
    n : float
        A byte count.

    Returns
    -------
    str
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {unit}"


def estimate(
    n_users: int,
    n_items: int,
    nnz: int,
    n_samples: int,
    batch_size: int,
    hidden: tuple[int, int, int] = (256, 512, 256),
    path: str = "dense",
    softmax: str = "full",
    negatives: int | None = None,
    out_dtype: torch.dtype | None = None,
    max_row_length: int | None = None,
    optimizer: str = "adam",
    device: str = "cuda",
    values: bool = False,
    n_eval_samples: int = 0,
    eval_batch_size: int | None = None,
    precision: str = "fp32",
    world_size: int = 1,
    epoch_samples: int | None = None,
    mean_bag_length: float | None = None,
    compiled: bool = False,
    lazy_names: tuple[str, ...] | None = None,
) -> MemoryPlan:
    """Estimate the device bytes of training :class:`~gpu_ann.model.CandidateGenerator` with these settings.

    Pure arithmetic on the sizes: nothing is allocated and the device is not touched.

    Parameters
    ----------
    n_users, n_items, nnz : int
        Shape and stored entries of the training input matrix.
    n_samples : int
        Training samples the loader holds (one per training interaction; under ``torchrun`` every rank
        holds all of them, under ``--shard-users`` only its own users').
    batch_size : int
        Rows per training batch.
    hidden : tuple of three ints
        The model's ``(h0, h1, h2)``.
    path : {"dense", "sparse"}
        First layer on the densified row, or an ``EmbeddingBag`` over the row's items.
    softmax : {"full", "sampled"}
        Training loss over all items, or over the target and ``negatives`` sampled items.
    negatives : int, optional
        ``k``, required for ``softmax="sampled"``.
    out_dtype : torch.dtype, optional
        Dtype of the dense batch buffer (``torch.float32`` or ``torch.bfloat16``); default bfloat16 for
        ``precision="bf16"``, else float32.
    max_row_length : int, optional
        The longest user row (the sparse path's bag buffer holds ``batch_size`` of them); required for
        ``path="sparse"``.
    optimizer : {"adam", "lazy-adam", "auto", "sgd"}
        Adam keeps two moments per parameter, plain SGD none; ``"lazy-adam"`` (:mod:`gpu_ann.optim`) keeps
        Adam's moments but gives the item tables a step reads only rows of sparse gradients, ``"auto"``
        those of them whose sparse gradients on all ``world_size`` ranks hold fewer rows than the table
        (:func:`gpu_ann.optim.lazy_tables`).
    device : {"cuda", "cpu"}
        Decides the size of Adam's step temporaries (foreach on CUDA, per tensor on the CPU).
    values : bool
        The matrix stores a float32 value per entry (rating / residual input modes).
    n_eval_samples : int
        Samples copied to the device by the evaluation sets (all of them, not only those scored).
    eval_batch_size : int, optional
        Rows per evaluation batch (default ``batch_size``).
    precision : {"fp32", "bf16"}
        ``"bf16"`` counts what ``torch.autocast`` adds: bf16 copies of the weights and a gradient of one,
        and on CUDA the cached block of the bf16 logits (see :class:`~gpu_ann.objective.Objective`).
    world_size : int
        Ranks of a ``torchrun`` run: above 1 the gradients are all-reduced in a flat buffer of all
        parameters, and this rank's epoch order holds its share of the samples.
    epoch_samples : int, optional
        Samples in this rank's epoch order (default ``ceil(n_samples / world_size)``; under
        ``--shard-users`` the largest rank's count).
    mean_bag_length : float, optional
        The expected bag length of a training sample (``gpu_ann.path_cost.row_statistics``): with
        ``"lazy-adam"`` on the sparse path, the item table's sparse gradient holds about ``batch_size``
        times as many rows. Default ``max_row_length``, the bound.
    compiled : bool
        The run is ``torch.compile``-d, which traces no sparse gradient: ``"auto"`` then means Adam, and
        ``"lazy-adam"`` is refused by the trainer (:func:`check` offers it only without ``--compile``).
    lazy_names : tuple of str, optional
        The tables updated lazily, given rather than decided from ``optimizer``: a resumed run's, as its
        saved optimiser state names them.

    Returns
    -------
    MemoryPlan

    Raises
    ------
    ValueError
        An unknown ``path``, ``softmax``, ``optimizer``, ``device`` or ``precision``; a size below 1 (0
        allowed for ``nnz``, ``n_samples``, ``n_eval_samples``, ``epoch_samples``); ``negatives`` missing
        for the sampled softmax, ``max_row_length`` missing for the sparse path, or ``"lazy-adam"`` with
        the dense path and the full softmax (no sparse gradient).
    """
    settings = dict(locals())  # the arguments, for check() to re-estimate with other settings
    _check_choice("path", path, ("dense", "sparse"))
    _check_choice("softmax", softmax, ("full", "sampled"))
    _check_choice("optimizer", optimizer, ("auto", "adam", "lazy-adam", "sgd"))
    _check_choice("device", device, ("cuda", "cpu"))
    _check_choice("precision", precision, ("fp32", "bf16"))
    counts = (nnz, n_samples, n_eval_samples, epoch_samples or 0)
    if min(n_users, n_items, batch_size, world_size, *hidden) < 1 or min(counts) < 0:
        raise ValueError(
            f"sizes must be positive: n_users={n_users}, n_items={n_items}, batch_size={batch_size}, "
            f"world_size={world_size}, hidden={hidden}, nnz={nnz}, n_samples={n_samples}, "
            f"n_eval_samples={n_eval_samples}, epoch_samples={epoch_samples}"
        )
    if compiled and optimizer == "auto":
        optimizer = "adam"
    if epoch_samples is None:
        epoch_samples = -(-n_samples // world_size)  # this rank's share of each epoch
    if softmax == "sampled" and not (negatives and negatives >= 1):
        raise ValueError(f"the sampled softmax needs negatives >= 1, got {negatives}")
    if path == "sparse" and not (max_row_length and max_row_length >= 1):
        raise ValueError(f"the sparse path needs max_row_length >= 1 (the longest user row), got {max_row_length}")
    f32, i64, bf16 = 4, 8, 2
    bf16_run = precision == "bf16"
    if out_dtype is None:
        out_dtype = torch.bfloat16 if bf16_run else torch.float32
    n, B = n_items, batch_size
    h0, h1, h2 = hidden
    B_eval = eval_batch_size or batch_size

    csr = (n_users + 1) * i64 + nnz * 4 + (nnz * f32 if values else 0)
    # The loader keeps every (user, item) as int32 and this rank's epoch order as int64; an evaluation set
    # is counted the same (its pairs and order).
    samples = n_samples * 2 * 4 + epoch_samples * i64 + n_eval_samples * (2 * 4 + i64)
    sampler = n * (8 + i64 + f32) if softmax == "sampled" else 0
    if path == "dense":
        batch = B * (n + 3) * torch.empty(0, dtype=out_dtype).element_size() + B * i64
    else:
        L = max_row_length
        batch = B * L * (i64 + f32) + (B + 1) * i64 + B * 3 * f32 + B * i64

    shapes = [(n + 3, h0), (h0, h1), (h1,), (h1, h2), (h2,), (h2, n), (n,)]
    sizes = [_numel(s) for s in shapes]
    P = sum(sizes)
    parameters = P * f32
    optimizer_bytes = 0 if optimizer == "sgd" else 2 * P * f32
    # lazy Adam: (rows, width) of each sparse gradient, and the dense parameters' sizes without those tables.
    lazy, dense_sizes = [], list(sizes)
    if lazy_names is not None or optimizer in ("auto", "lazy-adam"):
        # The choice on the mean as given (the trainer's, the same on every rank); the rows counted at most this
        # rank's longest row per bag.
        given = max_row_length if mean_bag_length is None else mean_bag_length
        names = lazy_names
        if names is None:
            names = lazy_tables(optimizer, path, softmax, n, B, given or 0.0, negatives or 0, world_size=world_size)
        mean = min(given or 0.0, max_row_length or 0)
        if optimizer == "lazy-adam" and not names:
            raise ValueError("optimizer 'lazy-adam' needs path 'sparse' or softmax 'sampled' (no sparse gradient)")
        if "embed.item_table" in names:
            # One gradient row per bag entry, repeats not merged: a batch's total, about B x the mean bag.
            lazy.append((math.ceil(B * mean), h0))
            dense_sizes[0] = 3 * h0  # of the first layer only the count features' weight
        if "out.weight" in names:
            lazy += [(B + negatives, h2), (B + negatives, 1)]  # the output layer's weight and bias
            dense_sizes[-2:] = []
    sparse_rows = sum(rows * (d * f32 + i64) for rows, d in lazy)
    gradients = sum(dense_sizes) * f32 + sparse_rows
    # torchrun: Replicas.average_gradients' flat buffer of the dense gradients, made once; the sparse ones
    # are gathered from every rank (padded, then concatenated: twice W times one rank's rows).
    gradient_buffer = sum(dense_sizes) * f32 + 2 * world_size * sparse_rows if world_size > 1 else 0
    if optimizer == "sgd":
        optimizer_step = 0
    elif device == "cuda":
        optimizer_step = sum(dense_sizes) * f32  # foreach Adam: sqrt of every second moment at once
    else:
        optimizer_step = 2 * max(dense_sizes) * f32  # per-tensor Adam: sqrt, then the divided copy
    if lazy:  # after Adam, RowAdam: one table at a time, its gradient coalesced, then the rows' m and v
        distinct = [(min(world_size * r, n), d) for r, d in lazy]  # every rank's rows, once averaged
        # RowAdam's temporaries: the rows' old moments and their two updates, four U x d at the peak.
        optimizer_step = max(optimizer_step, max(u * (d * f32 + i64) + 4 * u * d * f32 for u, d in distinct))

    activations = 2 * B * (h0 + 2 * h1 + 2 * h2) * f32
    if path == "sparse":
        activations += B * max_row_length * 3 * i64  # bag index map, and the backward's sorted indices
    # autocast casts every weight a matmul reads to bf16 and keeps the copies through the step (its cache
    # until the forward ends, then what the backward saved): all parameters but the bag path's item table,
    # which embedding_bag reads in float32; the sampled softmax casts the k gathered output rows, not all n.
    # The backward then makes a bf16 gradient of one copy at a time.
    read_by_matmul = list(sizes)
    if path == "sparse":
        read_by_matmul[0] = 3 * h0  # of the first layer only the count features' weight
    # bf16 logits are freed as soon as their float32 copy exists. Measured on the CPU, malloc hands the block
    # back at once; CUDA's caching allocator keeps it (too small for the float32 arrays that follow) until
    # the logits' bf16 gradient reuses it, so there it sits beside the three float32 arrays.
    cached_bf16 = bf16_run and device == "cuda"
    if softmax == "full":
        logits = 3 * B * n * f32 + (B * n * bf16 if cached_bf16 else 0)
        casts = read_by_matmul
    else:
        k = negatives
        logits = 3 * B * (k + 1) * f32 + B * k + 2 * (B + k) * h2 * f32 + (B * k * bf16 if cached_bf16 else 0)
        casts = [*read_by_matmul[:-2], h2 * k, k]
    autocast = (sum(casts) + max(casts)) * bf16 if bf16_run else 0
    evaluation = 2 * B_eval * n * f32 + B_eval * (h0 + h1 + h2) * f32
    if bf16_run:  # the weight copies (no gradients without autograd), and on CUDA the cached bf16 logits
        evaluation += sum(read_by_matmul) * bf16 + (B_eval * n * bf16 if cached_bf16 else 0)
    return MemoryPlan(
        csr,
        samples,
        sampler,
        batch,
        parameters,
        gradients,
        optimizer_bytes,
        optimizer_step,
        activations,
        logits,
        evaluation,
        gradient_buffer,
        autocast,
        settings,
    )


def check(plan: MemoryPlan, budget_bytes: int, where: str = "the memory budget") -> None:
    """Raise :class:`MemoryBudgetExceeded` when ``plan.total`` exceeds ``budget_bytes``.

    Call it before allocating anything. The message names the estimate and its three largest terms,
    the limit and where it came from, then what would fit: the largest batch size (when one does), and
    the estimate with ``--input-path sparse``, with ``--softmax sampled`` and with both (those the plan
    does not use already; the sparse path is only tried when the plan's settings give ``max_row_length``),
    and with ``--optimizer lazy-adam`` (``without --compile`` for a compiled run) when the plan uses Adam on
    the sparse path or the sampled softmax and lazy Adam's estimate is the lower one (whether or not it
    then fits).

    Parameters
    ----------
    plan : MemoryPlan
        From :func:`estimate`.
    budget_bytes : int
        The limit, e.g. ``0.9 * device_budget(device)`` or a ``--memory-budget``.
    where : str
        Where the limit comes from, for the message (``"free memory on cuda:0"``).

    Raises
    ------
    MemoryBudgetExceeded
        The estimate is over the budget.
    """
    if plan.total <= budget_bytes:
        return
    terms = ", ".join(f"{label} {format_bytes(v)}" for label, v in plan.largest(3))
    message = (
        f"training needs an estimated {format_bytes(plan.total)} ({terms}) but the limit is "
        f"{format_bytes(budget_bytes)} ({where}); nothing was allocated."
    )
    advice = []
    s = plan.settings
    if s:
        best = _largest_fitting_batch(s, budget_bytes)
        if best:
            fits = estimate(**{**s, "batch_size": best}).total
            advice.append(f"a --batch-size of at most {best} (est. {format_bytes(fits)})")
        elif s["batch_size"] > 1:
            at_one = format_bytes(estimate(**{**s, "batch_size": 1}).total)
            advice.append(f"no --batch-size fits with these settings ({at_one} at 1)")
        k = s.get("negatives") or 1024
        options = []
        if s["path"] == "dense" and s.get("max_row_length"):
            options.append(("--input-path sparse", {"path": "sparse"}))
        if s["softmax"] == "full":
            options.append((f"--softmax sampled (with {k} negatives)", {"softmax": "sampled", "negatives": k}))
        if len(options) == 2:
            options.append(("both", {**options[0][1], **options[1][1]}))
        if s.get("optimizer", "adam") in ("adam", "auto") and (s["path"] == "sparse" or s["softmax"] == "sampled"):
            # Only where it saves memory: with bags longer in all than the catalogue, a sparse gradient is larger.
            lazy = {"optimizer": "lazy-adam", "compiled": False}
            if estimate(**{**s, **lazy}).total < plan.total:
                # torch.compile traces no sparse gradient, so the trainer refuses lazy-adam with it.
                label = "--optimizer lazy-adam without --compile" if s.get("compiled") else "--optimizer lazy-adam"
                options.append((label, lazy))
        for label, change in options:
            advice.append(f"{label} (est. {format_bytes(estimate(**{**s, **change}).total)})")
    if advice:
        message += " To fit, use " + "; or ".join(advice) + "."
    raise MemoryBudgetExceeded(message)


def _largest_fitting_batch(settings: dict, budget: int) -> int:
    """The largest batch size (<= the planned one) whose estimate fits ``budget``, or 0."""
    lo, hi = 0, settings["batch_size"]
    while lo < hi:  # the total grows with the batch size: bisect
        mid = (lo + hi + 1) // 2
        if estimate(**{**settings, "batch_size": mid}).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape."""
    out = 1
    for s in shape:
        out *= s
    return out


def _check_choice(name: str, value, choices: tuple) -> None:
    """ValueError naming ``value`` unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {choices}")
