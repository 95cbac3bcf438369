"""Scoring every user of a trained run: top-K lists to Parquet or CSV, and optionally the full score matrix.

Each user's input row is built by the training kernel from the run's input interactions (training, plus
the fold-in rows of held-out users under the ``users`` protocol), exactly as :func:`gpu_ann.evaluate_run`
builds it. Those input items are excluded: they score ``-inf`` in the matrix and are left out of the
top-K lists. Equal scores are ranked by the lower item index (a stable descending sort, as in
:mod:`gpu_ann.ranking`). Users are scored in batches on the backend; every output file is written to a
temporary file in its directory and moved into place with ``os.replace`` once all of them are complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TOP_K_COLUMNS = ("user_id", "rank", "item_id", "score")
TABLE_SUFFIXES = (".parquet", ".csv")
DEFAULT_MAX_MATRIX_BYTES = 2 * 1024**3  # 2 GiB


class ScoringError(ValueError):
    """Scoring cannot be done as asked (a bad output name, a score matrix too large); the message says why."""


@dataclass
class ScoreSummary:
    """What :func:`score_run` wrote.

    Attributes
    ----------
    users : int
        Users scored (rows of the matrix, distinct users of the top-K file).
    items : int
        Items of the run (columns of the matrix).
    rows : int
        Rows of the top-K file: ``k`` per user, fewer for a user with fewer items left to recommend.
    out : Path
        The top-K file.
    matrix : Path or None
        The score matrix (``.npy``), when asked for.
    id_files : tuple of Path
        The raw user and item ids of the matrix's rows and columns, one per line (empty without a matrix).
    seconds : float
        Wall time, loading included.
    """

    users: int
    items: int
    rows: int
    out: Path
    matrix: Path | None
    id_files: tuple[Path, ...]
    seconds: float


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best columns of each row, equal scores ordered by the lower column index.

    A stable descending sort, as in :mod:`gpu_ann.ranking`, so the order does not depend on the device
    or on ``torch.topk``'s handling of ties.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, n]`` scores; excluded items hold ``-inf``.
    k : int
        How many columns to keep (at most ``n``).

    Returns
    -------
    index : torch.Tensor
        ``[B, min(k, n)]`` int64 item indices, best first.
    value : torch.Tensor
        Their scores.
    valid : torch.Tensor
        Bool, False where the score is ``-inf`` (an excluded item, never recommended); valid entries
        come first in each row.
    """
    k = min(k, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    value, index = order.values[:, :k], order.indices[:, :k]
    return index, value, value > float("-inf")


def matrix_bytes(n_users: int, n_items: int) -> int:
    """Size of a float32 ``n_users x n_items`` score matrix, in bytes (the ``.npy`` header aside).

    Parameters
    ----------
    n_users, n_items : int
        The matrix's shape.

    Returns
    -------
    int
    """
    return int(n_users) * int(n_items) * 4


def id_file_paths(matrix: str | Path) -> tuple[Path, Path]:
    """The companion files of a score matrix: ``FILE.users.txt`` and ``FILE.items.txt`` beside ``FILE.npy``.

    Parameters
    ----------
    matrix : str or Path
        The matrix file, ``FILE.npy``.

    Returns
    -------
    users, items : Path
        One raw id per line: the users of the matrix's rows and the items of its columns, in order.
    """
    matrix = Path(matrix)
    return matrix.with_suffix(".users.txt"), matrix.with_suffix(".items.txt")


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class _Staged:
    """Temporary files beside their targets, moved into place together by :meth:`commit`."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def new(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        self.pairs.append((Path(tmp), path))
        return Path(tmp)

    def commit(self) -> None:
        for tmp, _ in self.pairs:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in self.pairs:
            os.replace(tmp, path)
        self.pairs = []

    def discard(self) -> None:
        for tmp, _ in self.pairs:
            tmp.unlink(missing_ok=True)
        self.pairs = []


def _table_writer(path: Path, tmp: Path, schema):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        return pq.ParquetWriter(tmp, schema)
    return pcsv.CSVWriter(tmp, schema)


def score_run(
    run_dir: str | Path,
    out: str | Path,
    k: int = 100,
    split: str = "test",
    all_users: bool = False,
    matrix: str | Path | None = None,
    max_matrix_bytes: int = DEFAULT_MAX_MATRIX_BYTES,
    backend: str = "auto",
    batch_size: int = 1024,
) -> ScoreSummary:
    """Top-K items of every user with items in a split (or of all users), and optionally all their scores.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by training (``data.npz`` and ``model.pt``).
    out : str or Path
        The top-K file, ``.parquet`` or ``.csv`` (by extension): long format, one row per (user, rank),
        columns ``user_id, rank, item_id, score`` with raw ids, users in user-index order, ranks from 1.
    k : int
        Items per user; fewer for a user with fewer items left once the input items are excluded.
    split : {"train", "validation", "test"}
        Score the users that have items in this split of the run.
    all_users : bool
        Score every user of the run instead (``split`` is then ignored).
    matrix : str or Path, optional
        Also write the scores of the same users for every item as a float32 ``.npy`` matrix: rows are the
        scored users in user-index order, columns the items in item-index order (the run's id maps), the
        input items ``-inf``. The raw ids of the rows and columns go to ``FILE.users.txt`` and
        ``FILE.items.txt`` (see :func:`id_file_paths`). The matrix is filled batch by batch through a
        memory map, never held in memory whole.
    max_matrix_bytes : int
        Refuse a matrix larger than this (before any scoring), 2 GiB by default.
    backend : {"auto", "cpu", "cuda"}
        Where the input rows are built and the model runs.
    batch_size : int
        Users per batch.

    Returns
    -------
    ScoreSummary

    Raises
    ------
    ScoringError
        An output name with the wrong extension, a bad ``k`` or ``batch_size``, or a matrix above
        ``max_matrix_bytes``.
    ValueError
        An unknown split.
    CheckpointError
        The run directory is missing a file, or its model does not match its data.
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    from gpu_ann.backend import get_backend
    from gpu_ann.batching import BatchAssembler
    from gpu_ann.checkpoint import load_checkpoint, load_data
    from gpu_ann.model import CandidateGenerator
    from gpu_ann.ranking import rows_mask
    from gpu_ann.splits import SPLIT_NAMES, Samples, splits_from_assignment
    from gpu_ann.values import input_matrix

    started = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in TABLE_SUFFIXES:
        raise ScoringError(f"{out}: the top-K file must end in .parquet or .csv")
    if matrix is not None:
        matrix = Path(matrix)
        if matrix.suffix.lower() != ".npy":
            raise ScoringError(f"{matrix}: the score matrix file must end in .npy")
        if matrix.resolve() == out.resolve():
            raise ScoringError(f"{out}: the top-K file and the matrix must be different files")
    if k < 1 or batch_size < 1:
        raise ScoringError(f"k and batch_size must be positive, got k={k}, batch_size={batch_size}")
    if not all_users and split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLIT_NAMES}")

    table, assignment = load_data(Path(run_dir))
    splits = splits_from_assignment(table, assignment)
    if all_users:
        users = np.arange(table.n_users, dtype=np.int32)
    else:
        users = np.flatnonzero(np.bincount(splits[split].user, minlength=table.n_users) > 0).astype(np.int32)
    n_items = table.n_items
    if matrix is not None:
        need = matrix_bytes(len(users), n_items)
        if need > max_matrix_bytes:
            raise ScoringError(
                f"the score matrix of {len(users):,} users x {n_items:,} items would take {need:,} bytes "
                f"({_format_bytes(need)} of float32), above the limit of {max_matrix_bytes:,} bytes "
                f"({_format_bytes(max_matrix_bytes)}); raise --max-matrix-bytes, score fewer users "
                "(--split instead of --all-users), or leave out --matrix and keep the top-K file"
            )

    ckpt = load_checkpoint(Path(run_dir), table)
    b = get_backend(backend)
    device = b.torch_device
    # Training plus fold-in rows (held-out users' known items), valued as the model was trained.
    inputs = input_matrix(b, table, assignment, ckpt.config.get("input_values", "implicit"))
    seen = b.to_host(inputs.indptr), b.to_host(inputs.indices)
    model = CandidateGenerator.from_checkpoint(ckpt, device)
    batch_size = max(1, min(batch_size, len(users)))
    # One sample per scored user whose target (-1) is no item: the kernel keeps the whole input row.
    assembler = BatchAssembler(inputs, Samples(users, np.full_like(users, -1)), batch_size, allow_no_target=True)

    user_type = pa.array(table.user_ids[:0]).type
    item_type = pa.array(table.item_ids[:0]).type
    schema = pa.schema([("user_id", user_type), ("rank", pa.int32()), ("item_id", item_type), ("score", pa.float32())])
    staged = _Staged()
    rows = 0
    try:
        writer = _table_writer(out, staged.new(out), schema)
        scores_out = None
        if matrix is not None:
            matrix_tmp = staged.new(matrix)
            if len(users):
                scores_out = np.lib.format.open_memmap(
                    matrix_tmp, mode="w+", dtype=np.float32, shape=(len(users), n_items)
                )
            else:
                np.save(matrix_tmp, np.empty((0, n_items), dtype=np.float32))
        try:
            with tqdm(total=len(users), unit="user", desc="scoring", disable=None) as bar, torch.no_grad():
                for start in range(0, len(users), batch_size):
                    positions = np.arange(start, min(start + batch_size, len(users)), dtype=np.int64)
                    X, _ = assembler.assemble(assembler.to_device_indices(positions))
                    batch_users = users[positions]
                    scores = model(X).float()
                    scores = scores.masked_fill(rows_mask(*seen, batch_users, n_items, device), float("-inf"))
                    index, value, valid = top_k(scores, k)
                    index, value, valid = index.cpu().numpy(), value.cpu().numpy(), valid.cpu().numpy()
                    row_of, rank0 = np.nonzero(valid)  # valid entries lead each row: ranks stay contiguous
                    writer.write_table(
                        pa.table(
                            {
                                "user_id": pa.array(table.user_ids[batch_users[row_of]], type=user_type),
                                "rank": pa.array((rank0 + 1).astype(np.int32)),
                                "item_id": pa.array(table.item_ids[index[row_of, rank0]], type=item_type),
                                "score": pa.array(value[row_of, rank0].astype(np.float32)),
                            },
                            schema=schema,
                        )
                    )
                    rows += len(row_of)
                    if scores_out is not None:
                        scores_out[positions[0] : positions[-1] + 1] = scores.cpu().numpy()
                    bar.update(len(positions))
        finally:
            writer.close()
            if scores_out is not None:
                scores_out.flush()
                del scores_out
        id_files: tuple[Path, ...] = ()
        if matrix is not None:
            id_files = id_file_paths(matrix)
            for path, ids in zip(id_files, (table.user_ids[users], table.item_ids)):
                text = "".join(f"{v}\n" for v in ids.tolist())
                staged.new(path).write_text(text, encoding="utf-8")
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return ScoreSummary(len(users), n_items, rows, out, matrix, id_files, time.perf_counter() - started)
