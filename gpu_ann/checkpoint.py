"""Run directories: the data a run saw (``data.npz``) and its best model (``model.pt``).

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a crash leaves the previous version or the new one, never half of one (a run's first
checkpoint, several files, is made atomic as a set by :mod:`gpu_ann.run_directory`). Loading never
unpickles arbitrary objects: ``np.load(allow_pickle=False)`` and ``torch.load(weights_only=True)``. A file
for other data or of another model shape is refused with a message that says what differs.
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

# 2: model.pt and last.pt also hold data_summary (the data's sizes), for messages that say what differs.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 files load as they are, without data_summary
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
    return _hash(table.user_ids, table.item_ids)


def _hash(*id_maps: np.ndarray) -> str:
    """The first 16 hex digits of a SHA-256 over the arrays' dtypes and bytes, in order."""
    h = hashlib.sha256()
    for ids in id_maps:
        h.update(str(ids.dtype).encode())
        h.update(np.ascontiguousarray(ids).tobytes())
    return h.hexdigest()[:16]


def data_summary(table: RatingsTable) -> dict[str, Any]:
    """The data's sizes and a hash of each id map, kept in checkpoint headers to say how other data differs.

    Parameters
    ----------
    table : RatingsTable
        The data a run trains on.

    Returns
    -------
    dict
        ``n_users``, ``n_items`` (int) and ``user_ids``, ``item_ids`` (16 hex digits each).
    """
    return {
        "n_users": table.n_users,
        "n_items": table.n_items,
        "user_ids": _hash(table.user_ids),
        "item_ids": _hash(table.item_ids),
    }


def data_difference(
    stored: dict[str, Any] | None, table: RatingsTable, model_state=None, here="the checkpoint", there="the data"
) -> str:
    """What differs, in words, between the data a file was written for and ``table`` (fingerprints differ).

    Parameters
    ----------
    stored : dict or None
        The file's :func:`data_summary`; None for a version 1 file, where only the output layer tells
        ``n_items`` (from ``model_state``).
    table : RatingsTable
        The data it is to be used with.
    model_state : dict, optional
        The file's weights.
    here, there : str
        How the message names the file and the data.

    Returns
    -------
    str
        For example ``"n_items 7,157 in the checkpoint vs 7,160 in the data"``.
    """
    now = data_summary(table)
    if stored is None and model_state is not None and "out.bias" in model_state:
        stored = {"n_items": len(model_state["out.bias"])}
    stored = stored or {}
    parts = [
        f"{key} {stored[key]:,} in {here} vs {now[key]:,} in {there}"
        for key in ("n_users", "n_items")
        if key in stored and stored[key] != now[key]
    ]
    if not parts:
        parts = [
            f"the same {now['n_' + noun]:,} {noun} but other {noun[:-1]} ids or another order"
            for noun in ("users", "items")
            if f"{noun[:-1]}_ids" in stored and stored[f"{noun[:-1]}_ids"] != now[f"{noun[:-1]}_ids"]
        ]
    return "; ".join(parts) or f"other users or items ({here} is of format version 1, which stores no sizes)"


def check_model_shape(path: Path, model_state: dict, hidden, n_items: int | None = None, where="its config") -> None:
    """Refuse weights whose hidden sizes (or number of items) are not the expected ones, saying which differ.

    Parameters
    ----------
    path : Path
        The file the weights come from, for the message.
    model_state : dict
        A :class:`~gpu_ann.model.CandidateGenerator` ``state_dict`` (either first-layer layout).
    hidden : sequence of int
        The expected hidden sizes; ``where`` says where they come from.
    n_items : int, optional
        The expected number of items (of the data).
    where : str
        How the message names the source of ``hidden``.

    Raises
    ------
    CheckpointError
        For example ``"hidden (16,16,16) in the weights vs (8,8,8) in its config"``.
    """
    try:
        out, first = model_state["out.weight"], model_state.get("embed.item_table")
        h0 = first.shape[1] if first is not None else model_state["embed.weight"].shape[0]
        shape = len(out), (int(h0), int(model_state["mlp.0.weight"].shape[0]), int(out.shape[1]))
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a candidate generator's weights (no {exc})") from exc
    parts = []
    if n_items is not None and shape[0] != n_items:
        parts.append(f"n_items {shape[0]:,} in the weights vs {n_items:,} in the data")
    if shape[1] != tuple(hidden):
        parts.append(f"hidden {_sizes(shape[1])} in the weights vs {_sizes(hidden)} in {where}")
    if parts:
        raise CheckpointError(f"{path}: a model of another shape: " + "; ".join(parts))


def _sizes(hidden) -> str:
    """``(16,16,16)``: hidden sizes as the messages write them."""
    return "(" + ",".join(str(h) for h in hidden) + ")"


def _check_version(path: Path, version) -> None:
    """Refuse a file of a format version this gpu-ann cannot read, naming both."""
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise CheckpointError(f"{path}: format version {version}, this gpu-ann reads versions {readable}")


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
        ``data.npz`` is missing, of another format version, or its id maps do not match the stored fingerprint.
    """
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {run_dir} a gpu-ann run directory?)")
    with np.load(path, allow_pickle=False) as z:
        _check_version(path, int(z["format_version"]) if "format_version" in z.files else None)
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
    data_summary : dict, optional
        :func:`data_summary` of the data (None in version 1 files).
    """

    model_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    step: int
    epoch: int
    best_validation_loss: float
    data_fingerprint: str
    optimizer_state: dict[str, Any] | None = None  # Adam's moments: plain tensors and numbers
    data_summary: dict[str, Any] | None = None


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
        "data_summary": ckpt.data_summary,
    }
    atomic_write(Path(run_dir) / MODEL_FILE, lambda f: torch.save(payload, f))
    text = to_toml(ckpt.config, "train")
    atomic_write(Path(run_dir) / CONFIG_FILE, lambda f: f.write(text), mode="w")


def load_checkpoint(run_dir: Path, table: RatingsTable | None = None, *, mmap: bool = False) -> Checkpoint:
    """Load ``model.pt``; with ``table``, refuse a checkpoint trained on other users or items.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    table : RatingsTable, optional
        The data the model is to be used with; checked against the checkpoint's fingerprint.
    mmap : bool
        Map the file instead of reading it (``torch.load(mmap=True)``): the tensors are read when touched,
        so checking shapes and fingerprint costs next to nothing (at 10**6 items the file is 1.5 GB).

    Returns
    -------
    Checkpoint
        With all tensors on the CPU.

    Raises
    ------
    CheckpointError
        ``model.pt`` is missing, unreadable with ``weights_only=True``, of another format version, of
        another shape than its config says, or trained on data other than ``table``; the message says
        what differs.
    """
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (did training write a checkpoint into {run_dir}?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read safely ({exc.__class__.__name__}: {exc})") from exc
    _check_version(path, payload.get("format_version"))
    ckpt = Checkpoint(**{k: v for k, v in payload.items() if k != "format_version"})
    if table is not None and ckpt.data_fingerprint != fingerprint(table):
        raise CheckpointError(
            f"{path}: trained on other data than {table.source or 'the data'}: "
            f"{data_difference(ckpt.data_summary, table, ckpt.model_state)} "
            f"(fingerprint {ckpt.data_fingerprint} vs {fingerprint(table)})"
        )
    check_model_shape(path, ckpt.model_state, ckpt.config["hidden"], None if table is None else table.n_items)
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
    data_summary : dict, optional
        :func:`data_summary` of the data (None in version 1 files).
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
    data_summary: dict[str, Any] | None = None


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
        The file is missing, unreadable, of another format version, or its weights are of another shape
        than its config says.
    """
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a run writes it at its first evaluation)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read safely ({exc.__class__.__name__}: {exc})") from exc
    _check_version(path, payload.pop("format_version", None))
    state = ResumeState(**payload)
    check_model_shape(path, state.model_state, state.config["hidden"])
    return state


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete temporary files a killed writer left in ``run_dir``; returns their names."""
    stale = [p for p in Path(run_dir).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]
