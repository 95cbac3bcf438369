"""Run directories: the data a run saw (``data.npz``) and its best model (``model.pt``).

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a crash leaves the previous version or the new one, never half of one. Loading
never unpickles arbitrary objects: ``np.load(allow_pickle=False)`` and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_ann.config import to_toml
from gpu_ann.data.table import RatingsTable, ReadSummary

FORMAT_VERSION = 1
DATA_FILE = "data.npz"
MODEL_FILE = "model.pt"
STATE_FILE = "last.pt"  # everything needed to continue the run exactly (gpu-ann train --resume)
# Test hook: seconds to wait between writing a checkpoint's temporary file and renaming it into place,
# so that a test can kill the process in the middle of a write.
PAUSE_ENV = "GPU_ANN_TEST_PAUSE_BEFORE_REPLACE"
CONFIG_FILE = "config.toml"  # the effective config, readable by --config


class CheckpointError(RuntimeError):
    """A run directory is missing, incomplete or does not match; the message says which file and why."""


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it into place.

    Parameters
    ----------
    path : Path
        The file to (re)write; its directory is created if needed.
    write : callable
        Writes the content to the open file object it is given.
    mode : str
        ``"wb"`` or ``"w"``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint(table: RatingsTable) -> str:
    """A short hash of the id maps: a model only fits data with the same users and items in the same order.

    Parameters
    ----------
    table : RatingsTable
        Only ``user_ids`` and ``item_ids`` (dtype and bytes) enter the hash.

    Returns
    -------
    str
        The first 16 hex digits of a SHA-256.
    """
    h = hashlib.sha256()
    for ids in (table.user_ids, table.item_ids):
        h.update(str(ids.dtype).encode())
        h.update(np.ascontiguousarray(ids).tobytes())
    return h.hexdigest()[:16]


def save_data(run_dir: Path, table: RatingsTable, assignment: np.ndarray) -> None:
    """The table (indices, id maps, titles) and each interaction's split, for recommend and evaluate.

    Written atomically to ``run_dir/data.npz`` (the directory is created if needed). Ratings and
    timestamps are not saved.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    table : RatingsTable
        The data the run was trained on.
    assignment : numpy.ndarray
        Split code of each interaction (0 train, 1 validation, 2 test, 3 fold-in), as the protocols return it.
    """
    arrays = {
        "user": table.user,
        "item": table.item,
        "split": assignment.astype(np.uint8),
        "user_ids": table.user_ids,
        "item_ids": table.item_ids,
        "fingerprint": np.array(fingerprint(table)),
        "source": np.array(table.source),
        "format_version": np.array(FORMAT_VERSION),
    }
    if table.item_titles is not None:
        arrays["item_titles"] = table.item_titles
    if table.rating is not None:
        arrays["rating"] = table.rating  # for the bias baseline and explicit input modes
    atomic_write(Path(run_dir) / DATA_FILE, lambda f: np.savez(f, **arrays))


def load_data(run_dir: Path) -> tuple[RatingsTable, np.ndarray]:
    """Read back what :func:`save_data` wrote, checking the id maps against their fingerprint.

    Parameters
    ----------
    run_dir : Path
        The run directory.

    Returns
    -------
    table : RatingsTable
        Indices, id maps, titles and ratings (when the data had them); ``timestamp`` is None.
    assignment : numpy.ndarray
        Split code of each interaction (0 train, 1 validation, 2 test, 3 fold-in).

    Raises
    ------
    CheckpointError
        ``data.npz`` is missing, or its id maps do not match the stored fingerprint.
    """
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {run_dir} a gpu-ann run directory?)")
    with np.load(path, allow_pickle=False) as z:
        table = RatingsTable(
            user=z["user"],
            item=z["item"],
            rating=z["rating"] if "rating" in z.files else None,
            timestamp=None,
            user_ids=z["user_ids"],
            item_ids=z["item_ids"],
            item_titles=z["item_titles"] if "item_titles" in z.files else None,
            source=str(z["source"]),
            summary=ReadSummary(rows_read=len(z["user"])),
        )
        assignment = z["split"]
        stored = str(z["fingerprint"])
    if stored != fingerprint(table):
        raise CheckpointError(f"{path}: the id maps do not match their stored fingerprint (file damaged?)")
    return table, assignment


@dataclass
class Checkpoint:
    """The contents of ``model.pt``: the best model so far and what is needed to use or resume it.

    Parameters
    ----------
    model_state : dict
        The model's ``state_dict`` (on the CPU once loaded).
    config : dict
        :meth:`TrainConfig.to_dict` of the run.
    step, epoch : int
        Where training was when this model was saved.
    best_validation_loss : float
        Its loss on the fixed validation batches (nats).
    data_fingerprint : str
        :func:`fingerprint` of the data it was trained on.
    optimizer_state : dict, optional
        The optimiser's ``state_dict``.
    """

    model_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    step: int
    epoch: int
    best_validation_loss: float
    data_fingerprint: str
    optimizer_state: dict[str, Any] | None = None  # Adam's moments: plain tensors and numbers


def _to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(v) for v in state)
    return state


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    """Write ``model.pt`` and then ``config.toml`` into ``run_dir``, each atomically.

    Tensors are copied to the CPU first (from the GPU: a device-to-host sync).

    Parameters
    ----------
    run_dir : Path
        The run directory (created if needed).
    ckpt : Checkpoint
        What to save.

    Raises
    ------
    ConfigError
        A config value cannot be written to TOML (a non-finite float); ``model.pt`` is written already.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "model_state": _to_cpu(ckpt.model_state),
        "config": ckpt.config,
        "step": ckpt.step,
        "epoch": ckpt.epoch,
        "best_validation_loss": ckpt.best_validation_loss,
        "data_fingerprint": ckpt.data_fingerprint,
        "optimizer_state": _to_cpu(ckpt.optimizer_state),
    }
    atomic_write(Path(run_dir) / MODEL_FILE, lambda f: torch.save(payload, f))
    text = to_toml(ckpt.config, "train")
    atomic_write(Path(run_dir) / CONFIG_FILE, lambda f: f.write(text), mode="w")


def load_checkpoint(run_dir: Path, table: RatingsTable | None = None) -> Checkpoint:
    """Load ``model.pt``; with ``table``, refuse a checkpoint trained on other users or items.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    table : RatingsTable, optional
        The data the model is to be used with; checked against the checkpoint's fingerprint.

    Returns
    -------
    Checkpoint
        With all tensors on the CPU.

    Raises
    ------
    CheckpointError
        ``model.pt`` is missing, unreadable with ``weights_only=True``, of another format version, or
        trained on data other than ``table``.
    """
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (did training write a checkpoint into {run_dir}?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read safely ({exc.__class__.__name__}: {exc})") from exc
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {payload.get('format_version')}, this gpu-ann reads {FORMAT_VERSION}"
        )
    ckpt = Checkpoint(**{k: v for k, v in payload.items() if k != "format_version"})
    if table is not None and ckpt.data_fingerprint != fingerprint(table):
        raise CheckpointError(
            f"{path}: trained on data with fingerprint {ckpt.data_fingerprint}, "
            f"but {table.source or 'the data'} has {fingerprint(table)} (other users or items)"
        )
    return ckpt


@dataclass
class ResumeState:
    """Everything a run needs to continue as if it had never stopped, written at every evaluation.

    Parameters
    ----------
    model_state, optimizer_state : dict
        The current (not the best) weights and Adam's moments.
    config : dict
        The run's :class:`gpu_ann.TrainConfig` as a dict.
    step, epoch, batch_in_epoch : int
        Steps taken, the current epoch, and the batches of it already used (the sampler's position).
    best_validation_loss : float
        Early stopping: the best validation loss so far ...
    bad_evals : int
        ... and the evaluations since it improved.
    history : list of dict
        The evaluation records so far (the lines of ``metrics.jsonl``).
    torch_rng : torch.Tensor
        torch's CPU generator state; ``cuda_rng`` the CUDA generators' (or an empty list).
    cuda_rng : list of torch.Tensor
        See ``torch_rng``.
    data_fingerprint : str
        Of the run's id maps (:func:`fingerprint`).
    finished : bool
        The run ended (early stop or its limit); resuming it does nothing.
    elapsed_s : float
        Seconds the run had taken, so a resumed run's times and throughput continue from there.
    sampler_rng : torch.Tensor, optional
        The negative sampler's generator state (sampled softmax), None otherwise.
    world_size : int
        Ranks the run trained with (1 outside ``torchrun``): an epoch's samples are split among them, so the
        sampler position ``batch_in_epoch`` means the same samples only with the same number of ranks.
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    config: dict[str, Any]
    step: int
    epoch: int
    batch_in_epoch: int
    best_validation_loss: float
    bad_evals: int
    history: list[dict]
    torch_rng: torch.Tensor
    cuda_rng: list
    data_fingerprint: str
    finished: bool = False
    elapsed_s: float = 0.0
    sampler_rng: torch.Tensor | None = None
    world_size: int = 1


def save_resume_state(run_dir: Path, state: ResumeState) -> None:
    """Write ``last.pt`` atomically (tensors moved to the CPU).

    Parameters
    ----------
    run_dir : Path
        The run directory.
    state : ResumeState
        What to write.
    """
    payload = {"format_version": FORMAT_VERSION, **{k: _to_cpu(v) for k, v in state.__dict__.items()}}
    atomic_write(Path(run_dir) / STATE_FILE, lambda f: torch.save(payload, f))


def load_resume_state(run_dir: Path) -> ResumeState:
    """Read ``last.pt`` without unpickling arbitrary objects.

    Parameters
    ----------
    run_dir : Path
        The run directory.

    Returns
    -------
    ResumeState

    Raises
    ------
    CheckpointError
        The file is missing, unreadable, or of another format version.
    """
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a run writes it at its first evaluation)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read safely ({exc.__class__.__name__}: {exc})") from exc
    if payload.pop("format_version", None) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by another gpu-ann format version")
    return ResumeState(**payload)


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete temporary files a killed writer left in ``run_dir``; returns their names."""
    stale = [p for p in Path(run_dir).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]
