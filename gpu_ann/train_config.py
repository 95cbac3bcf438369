"""The settings of a training run (:class:`TrainConfig`), what it returns (:class:`TrainResult`), and reading
the ratings it names (:func:`load_table`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gpu_ann.data.readers import load_bundled_anime, read_ratings
from gpu_ann.data.table import RatingsTable


@dataclass
class TrainConfig:
    """Everything a training run needs; the split and model defaults are the seed notebook's, the learning rate
    was tuned on validation (``bench/quality.py``: 1e-2 over the seed's 1e-3 on both benchmark data sets).

    Saved with every checkpoint (:meth:`to_dict`) and written as ``config.toml`` in the run directory.

    Parameters
    ----------
    data : str, optional
        Ratings file to read; ``None`` reads the bundled anime ratings.
    user_col, item_col, rating_col : str, optional
        Column names or 0-based positions for :func:`gpu_ann.read_ratings`; ``None`` lets it guess.
    sep : str, optional
        Field separator for text files; ``None`` picks it from the suffix or the first line.
    header : bool
        Whether a text file's first line holds column names.
    split : tuple of three floats
        Train / validation / test shares (of interactions, of each user's items, or of users, by protocol).
    protocol : {"random", "per-user", "leave-last", "users"}
        The split protocol, see :func:`gpu_ann.splits.make_split`.
    train_file, validation_file, test_file : str, optional
        A split given as files (read with the same column options); replaces ``data`` and ``protocol``.
    min_user_items : int
        ``per-user``: users with fewer interactions stay whole in training.
    leave_last : int
        ``leave-last``: interactions per user in each of validation and test.
    fold_in : float
        ``users``: share of a held-out user's items used as input.
    seed : int
        Seeds the split, the epoch orders, the evaluation batches and the model's initial weights.
    hidden : tuple of three ints
        Hidden layer widths of :class:`gpu_ann.CandidateGenerator`.
    lr : float
        Adam learning rate.
    optimizer : {"auto", "adam", "lazy-adam"}
        ``"lazy-adam"``: Adam for the dense layers, and for the item tables a step reads only rows of (the
        first layer's on the sparse input path, the output layer's under the sampled softmax) sparse
        gradients and lazy Adam (SparseAdam's update, :class:`gpu_ann.optim.RowAdam`), which updates only
        the rows each step touched (:mod:`gpu_ann.optim`);
        needs one of those two, not with ``compile``. ``"auto"``: lazy for those of the two tables whose
        step reads fewer rows than the table has, on all ``torchrun`` ranks together
        (:func:`gpu_ann.optim.lazy_tables`), Adam for the rest
        and for everything under ``compile``; with the dense path and the full softmax, plain Adam.
    batch_size : int
        Samples per training and evaluation batch.
    sampling : {"epoch", "replacement"}
        ``"epoch"``: each sample once per epoch, shuffled; ``"replacement"``: drawn with replacement
        (the seed notebook's sampling).
    eval_every : int
        Training steps between evaluations.
    eval_batches : int
        Fixed random batches per split (train and validation) in each evaluation.
    eval_batch_size : int, optional
        Rows per evaluation batch, at most ``batch_size`` (evaluation shares the training buffers); default
        ``batch_size``. Evaluation uses the full softmax, so at large catalogues a smaller one saves memory.
    patience : int
        Evaluations without a better validation loss before training stops.
    max_epochs : int
        Epochs to train when ``max_steps`` is None.
    max_steps : int, optional
        Steps to train; overrides ``max_epochs``.
    backend : {"auto", "cpu", "cuda"}
        See :func:`gpu_ann.get_backend`.
    out : str
        Run directory for data, checkpoint, config and logs.
    tensorboard : bool
        Also log to ``out/tensorboard`` (needs the tensorboard package).
    input_path : {"auto", "dense", "sparse"}
        First layer on densified rows, or ``EmbeddingBag`` over each row's items; ``"auto"`` picks the one
        that moves fewer bytes per step (:func:`gpu_ann.path_cost.choose_path`).
    softmax : {"full", "sampled"}
        Training loss over all items, or over the target and ``negatives`` sampled items with the log-Q
        correction; evaluation always uses the full softmax.
    negatives : int
        Negatives per batch for the sampled softmax.
    negative_sampling : {"popularity", "uniform"}
        Their proposal: training counts to the power 0.75 (plus one), or uniform.
    precision : {"fp32", "bf16"}
        ``"bf16"``: forward and loss under bfloat16 autocast (fp32 master weights), dense batches in bf16.
    compile : bool
        Compile the loss computation with ``torch.compile``.
    memory_budget : int, optional
        Bytes the run may use on its device; default 90% of the free device memory (CPU: available RAM).
        The planner refuses a run whose estimate exceeds it before allocating anything.
    replica_check_every : int
        Under ``torchrun``: every this many steps, check that all ranks hold identical weights (0: never).
    shard_users : bool
        Under ``torchrun``: each rank holds only its share of the users' rows and trains and evaluates
        their samples (:mod:`gpu_ann.sharding`), instead of the whole matrix and a share of the samples.
    deterministic : bool
        Deterministic mode for the GPU: ``torch.use_deterministic_algorithms(True)`` for the run (ops without
        a deterministic version raise) and cuBLAS's fixed workspace. The batch kernels never use atomics,
        so they are deterministic either way; on the CPU a seed already gives identical runs.
    """

    # data: None = the bundled anime ratings
    data: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    sep: str | None = None
    header: bool = True
    # split: the seed's seeded random 80/10/10 split of the interactions
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    protocol: str = "random"  # random | per-user | leave-last | users (gpu_ann.splits.make_split)
    train_file: str | None = None  # the user's own split: training interactions (replaces data + protocol)
    validation_file: str | None = None  # ... validation interactions (needed with train_file)
    test_file: str | None = None  # ... test interactions (optional)
    min_user_items: int = 5  # per-user: users with fewer items stay in training
    leave_last: int = 1  # leave-last: items per user in each of validation and test
    fold_in: float = 0.8  # users: share of a held-out user's items used as input
    # model and optimiser: the seed's MLP; Adam at lr 1e-2, tuned on validation (bench/quality.py; the seed: 1e-3)
    input_values: str = "implicit"  # implicit | rating | residual (gpu_ann.values)
    hidden: tuple[int, int, int] = (256, 512, 256)
    lr: float = 1e-2
    optimizer: str = "auto"  # auto | adam | lazy-adam: sparse gradients and lazy updates for the item tables
    batch_size: int = 1024
    sampling: str = "epoch"  # "epoch": shuffled, each sample once per epoch; "replacement": the seed's
    # evaluation and stopping
    eval_every: int = 100  # steps between evaluations
    eval_batches: int = 10  # fixed random batches per split per evaluation
    eval_batch_size: int | None = None  # rows per evaluation batch (<= batch_size); None = batch_size
    patience: int = 5  # evaluations without a better validation loss before stopping
    max_epochs: int = 3
    max_steps: int | None = None
    # where
    backend: str = "auto"
    out: str = "runs/anime"
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs the tensorboard package)
    # scale: input path, softmax, precision, memory (gpu_ann.bags, gpu_ann.sampled, gpu_ann.planner)
    input_path: str = "auto"  # auto | dense | sparse
    softmax: str = "full"  # full | sampled
    negatives: int = 1024
    negative_sampling: str = "popularity"  # popularity | uniform
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False
    memory_budget: int | None = None  # bytes; None = 90% of what the device has free
    replica_check_every: int = 0  # torchrun: check every N steps that all ranks hold the same weights
    shard_users: bool = False  # torchrun: each rank holds its share of the users, not the whole matrix
    deterministic: bool = False  # GPU: deterministic torch algorithms and cuBLAS workspace

    def to_dict(self) -> dict:
        """The fields as a new dict (``dataclasses.asdict``: tuples stay tuples)."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns; losses are mean cross-entropies in nats.

    Parameters
    ----------
    run_dir : Path
        The run directory written.
    steps : int
        Optimiser steps taken.
    best_validation_loss : float
        Best loss on the fixed validation batches, the one checkpointed.
    final_validation_loss : float
        Loss of that best model on the whole validation split.
    popularity_validation_loss : float
        The add-one smoothed popularity baseline on the whole validation split.
    history : list of dict
        One record per evaluation (the lines of ``metrics.jsonl``).
    seconds : float
        Wall time from the start of the run to the end of training (reading and evaluations included,
        the final whole-split evaluation not).
    samples_per_second : float
        Training samples (``steps * batch_size``) over ``seconds``.
    example_user : str
        A raw user id of the data, for the hint printed at the end.
    config : TrainConfig
        The settings the run used.
    """

    run_dir: Path
    steps: int
    best_validation_loss: float
    final_validation_loss: float  # the best model on the whole validation split
    popularity_validation_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0  # training samples over the whole run's time, evaluation included
    example_user: str = ""  # a raw user id of the data, for the hint printed at the end
    config: TrainConfig | None = None  # the settings the run used


def load_table(cfg: TrainConfig) -> RatingsTable:
    """Read the ratings ``cfg`` names: ``cfg.data`` with its column options, or the bundled anime data.

    Parameters
    ----------
    cfg : TrainConfig
        Uses ``data``, ``user_col``, ``item_col``, ``rating_col``, ``sep`` and ``header``.

    Returns
    -------
    RatingsTable

    Raises
    ------
    DataError
        The file cannot be read as ratings; the message names the file, line and value.
    """
    if cfg.data is None:
        return load_bundled_anime()
    return read_ratings(
        cfg.data,
        user_col=cfg.user_col,
        item_col=cfg.item_col,
        rating_col=cfg.rating_col,
        sep=cfg.sep,
        header=cfg.header,
    )
