"""Memory planner: estimate a training run's device bytes and refuse, before allocating, what cannot fit.

:func:`estimate` adds up what a run holds on its device for the given sizes and choices; :func:`check`
compares that with a budget (:func:`device_budget`, or a user's limit) and raises
:class:`MemoryBudgetExceeded` with the estimate, the limit and the settings that would fit.

What is counted (fp32 model; ``P`` parameters, ``B`` batch rows, ``n`` items, ``k`` negatives)::

    csr            indptr (n_users + 1) x int64, indices nnz x int32 (+ nnz x float32 values)
    samples        training (user, item) int32 pairs + the epoch's int64 order; evaluation sets likewise
    sampler        sampled softmax: the alias table (float64 + int64) and log Q (float32), n each
    batch          dense: X [B, n + 3] in the batch dtype + y int64; sparse: B x max_row_length bag
                   indices (int64) and weights (float32), offsets, features [B, 3], y
    parameters     P x 4;  gradients  P x 4;  optimizer  Adam: 2 P x 4 (SGD: 0)
    optimizer_step Adam's temporaries: on CUDA (foreach) one tensor of P; on the CPU 2 x the largest
    activations    saved hidden layers and their gradients, 2 B (h0 + 2 h1 + 2 h2) x 4; sparse: + 24 B L
    logits         full: 3 B n x 4 (logits, log-softmax, gradient); sampled: 3 B (k + 1) x 4, the mask,
                   and the gathered output rows and their gradient, 2 (B + k) h2 x 4
    evaluation     full-softmax evaluation without autograd: 2 B_eval n x 4 plus hidden layers

The first seven are held for the whole run; the step's transients (activations + logits), the optimiser
step and evaluation happen one after another, so the total counts only the largest of the three. Bytes
outside torch's and CuPy's allocations (the CUDA context, about 0.5 GiB, or on the CPU the interpreter
and the host copy of the data) are not counted: leave headroom in the budget.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

MEMINFO = "/proc/meminfo"

_LABELS = {
    "csr": "training matrix (CSR)",
    "samples": "sample arrays",
    "sampler": "negative sampler tables",
    "batch": "batch buffers",
    "parameters": "model parameters",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "optimizer_step": "optimizer step temporaries",
    "activations": "activations",
    "logits": "logits, softmax and their gradients",
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
        Bytes of the transients: the optimiser step's; a training step's (activations + logits);
        an evaluation batch's.
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
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def persistent(self) -> int:
        """Bytes held for the whole run."""
        return self.csr + self.samples + self.sampler + self.batch + self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Estimated peak: the persistent bytes plus the largest of the three transients."""
        return self.persistent + max(self.activations + self.logits, self.optimizer_step, self.evaluation)

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
    out_dtype: torch.dtype = torch.float32,
    max_row_length: int | None = None,
    optimizer: str = "adam",
    device: str = "cuda",
    values: bool = False,
    n_eval_samples: int = 0,
    eval_batch_size: int | None = None,
) -> MemoryPlan:
    """Estimate the device bytes of training :class:`~gpu_ann.model.CandidateGenerator` with these settings.

    Pure arithmetic on the sizes: nothing is allocated and the device is not touched.

    Parameters
    ----------
    n_users, n_items, nnz : int
        Shape and stored entries of the training input matrix.
    n_samples : int
        Training samples (one per training interaction).
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
    out_dtype : torch.dtype
        Dtype of the dense batch buffer (``torch.float32`` or ``torch.bfloat16``).
    max_row_length : int, optional
        The longest user row (the sparse path's bag buffer holds ``batch_size`` of them); required for
        ``path="sparse"``.
    optimizer : {"adam", "sgd"}
        Adam keeps two moments per parameter, plain SGD none.
    device : {"cuda", "cpu"}
        Decides the size of Adam's step temporaries (foreach on CUDA, per tensor on the CPU).
    values : bool
        The matrix stores a float32 value per entry (rating / residual input modes).
    n_eval_samples : int
        Samples copied to the device by the evaluation sets (all of them, not only those scored).
    eval_batch_size : int, optional
        Rows per evaluation batch (default ``batch_size``).

    Returns
    -------
    MemoryPlan

    Raises
    ------
    ValueError
        An unknown ``path``, ``softmax``, ``optimizer`` or ``device``; a size below 1 (0 allowed for
        ``nnz``, ``n_samples``, ``n_eval_samples``); ``negatives`` missing for the sampled softmax, or
        ``max_row_length`` missing for the sparse path.
    """
    settings = dict(locals())  # the arguments, for check() to re-estimate with other settings
    _check_choice("path", path, ("dense", "sparse"))
    _check_choice("softmax", softmax, ("full", "sampled"))
    _check_choice("optimizer", optimizer, ("adam", "sgd"))
    _check_choice("device", device, ("cuda", "cpu"))
    if min(n_users, n_items, batch_size, *hidden) < 1 or min(nnz, n_samples, n_eval_samples) < 0:
        raise ValueError(
            f"sizes must be positive: n_users={n_users}, n_items={n_items}, batch_size={batch_size}, "
            f"hidden={hidden}, nnz={nnz}, n_samples={n_samples}, n_eval_samples={n_eval_samples}"
        )
    if softmax == "sampled" and not (negatives and negatives >= 1):
        raise ValueError(f"the sampled softmax needs negatives >= 1, got {negatives}")
    if path == "sparse" and not (max_row_length and max_row_length >= 1):
        raise ValueError(f"the sparse path needs max_row_length >= 1 (the longest user row), got {max_row_length}")
    f32, i64 = 4, 8
    n, B = n_items, batch_size
    h0, h1, h2 = hidden
    B_eval = eval_batch_size or batch_size

    csr = (n_users + 1) * i64 + nnz * 4 + (nnz * f32 if values else 0)
    # The loader keeps (user, item) as int32 and one epoch's order as int64; an evaluation set the same.
    samples = (n_samples + n_eval_samples) * (2 * 4 + i64)
    sampler = n * (8 + i64 + f32) if softmax == "sampled" else 0
    if path == "dense":
        batch = B * (n + 3) * torch.empty(0, dtype=out_dtype).element_size() + B * i64
    else:
        L = max_row_length
        batch = B * L * (i64 + f32) + (B + 1) * i64 + B * 3 * f32 + B * i64

    shapes = [(n + 3, h0), (h0, h1), (h1,), (h1, h2), (h2,), (h2, n), (n,)]
    sizes = [_numel(s) for s in shapes]
    P = sum(sizes)
    parameters = gradients = P * f32
    optimizer_bytes = 2 * P * f32 if optimizer == "adam" else 0
    if optimizer == "sgd":
        optimizer_step = 0
    elif device == "cuda":
        optimizer_step = P * f32  # foreach Adam: sqrt of every second moment at once
    else:
        optimizer_step = 2 * max(sizes) * f32  # per-tensor Adam: sqrt, then the divided copy

    activations = 2 * B * (h0 + 2 * h1 + 2 * h2) * f32
    if path == "sparse":
        activations += B * max_row_length * 3 * i64  # bag index map, and the backward's sorted indices
    if softmax == "full":
        logits = 3 * B * n * f32
    else:
        k = negatives
        logits = 3 * B * (k + 1) * f32 + B * k + 2 * (B + k) * h2 * f32
    evaluation = 2 * B_eval * n * f32 + B_eval * (h0 + h1 + h2) * f32
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
        settings,
    )


def check(plan: MemoryPlan, budget_bytes: int, where: str = "the memory budget") -> None:
    """Raise :class:`MemoryBudgetExceeded` when ``plan.total`` exceeds ``budget_bytes``.

    Call it before allocating anything. The message names the estimate and its three largest terms,
    the limit and where it came from, then what would fit: the largest batch size (when one does), and
    the estimate with ``--input sparse``, with ``--softmax sampled`` and with both (those the plan does
    not use already; the sparse path is only tried when the plan's settings give ``max_row_length``).

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
            options.append(("--input sparse", {"path": "sparse"}))
        if s["softmax"] == "full":
            options.append((f"--softmax sampled (with {k} negatives)", {"softmax": "sampled", "negatives": k}))
        if len(options) == 2:
            options.append(("both", {**options[0][1], **options[1][1]}))
        for label, change in options:
            advice.append(f"{label} (est. {format_bytes(estimate(**{**s, **change}).total)})")
    if advice:
        message += " To fit, use " + "; or ".join(advice) + "."
    raise MemoryBudgetExceeded(message)


def device_budget(device) -> int:
    """Bytes the run may use: free device memory on CUDA, available RAM on the CPU.

    On CUDA: ``torch.cuda.mem_get_info`` (creates the context on first use and waits for the device: a
    host-device sync; call it once, before training) plus what torch's caching allocator has reserved but
    not handed out. On the CPU: ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup v2 limit when
    one is set (containers), else ``os.sysconf`` available pages.

    Parameters
    ----------
    device : torch.device, str, or a backend
        Anything with a ``torch_device`` attribute (``CpuBackend`` / ``CudaBackend``), or a device.

    Returns
    -------
    int
        Bytes.
    """
    device = torch.device(getattr(device, "torch_device", device))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # host-device sync (once, before training)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    available = _meminfo_available()
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_headroom()
    return int(available if limit is None else min(available, limit))


def _meminfo_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """memory.max - memory.current of this process's cgroup v2, or None when unlimited or unreadable."""
    try:
        with open(os.path.join(root, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(root, "memory.current")) as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None


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
