"""Top-K items for a user of a trained run, in raw ids with titles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpu_ann.backend import get_backend
from gpu_ann.batching import BatchAssembler
from gpu_ann.checkpoint import load_checkpoint, load_data
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.splits import Samples


class UnknownId(KeyError):
    """A raw user or item id that the run's data does not hold."""


@dataclass
class Recommendation:
    """One ranked item of :meth:`Recommender.for_user`.

    Attributes
    ----------
    rank : int
        Position in the list, from 1.
    item_id : object
        The item's raw id, as in the ratings file.
    title : str
        The item's title, "" where the data has none.
    score : float
        The model's logit for the item.
    """

    rank: int
    item_id: object  # raw id, as in the ratings file
    title: str
    score: float  # the model's logit


class Recommender:
    """A trained model with its run's data, ready to rank items for known users.

    The model is user-free: its input is a row of items. For a known user that row is everything the
    user has rated (all splits), normalised exactly as in training, and those items are excluded
    from the ranking.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by training (``data.npz`` and ``model.pt``).
    backend : {"cpu", "auto", "cuda"}
        Where the model runs and the input row is built (see :func:`gpu_ann.get_backend`).

    Raises
    ------
    CheckpointError
        The run directory is missing a file, or its model does not match its data.
    BackendUnavailable
        ``backend="cuda"`` where CUDA cannot run.
    """

    def __init__(self, run_dir: str | Path, backend: str = "cpu") -> None:
        self.backend = get_backend(backend)
        self.table, _ = load_data(Path(run_dir))
        ckpt = load_checkpoint(Path(run_dir), self.table)
        self.model = CandidateGenerator(self.table.n_items, tuple(ckpt.config["hidden"]))
        self.model.load_state_dict(ckpt.model_state)
        self.model.to(self.backend.torch_device).eval()
        self.history = InteractionMatrix.from_pairs(
            self.backend, self.table.user, self.table.item, self.table.n_users, self.table.n_items
        )
        self._user_index = {raw: i for i, raw in enumerate(self.table.user_ids.tolist())}

    def user_index(self, raw_user_id: str) -> int:
        """The index of a raw user id given as text (ids read as integers match their decimal form).

        Parameters
        ----------
        raw_user_id : str
            The user's id as in the ratings file.

        Returns
        -------
        int
            Row index of the user in the run's data.

        Raises
        ------
        UnknownId
            The run's data holds no such user.
        """
        key: object = raw_user_id
        if self.table.user_ids.dtype.kind in "iu":
            try:
                key = int(raw_user_id)
            except ValueError:
                key = None
        if key not in self._user_index:
            raise UnknownId(f"user {raw_user_id!r} is not in the run's data ({self.table.n_users} users)")
        return self._user_index[key]

    @torch.no_grad()
    def for_user(self, raw_user_id: str, k: int = 10) -> list[Recommendation]:
        """The ``k`` highest-scoring items the user has not rated, best first.

        Runs without autograd; reading the user's row and the top ``k`` back to the host syncs with
        the device on cuda.

        Parameters
        ----------
        raw_user_id : str
            The user's id as in the ratings file (see :meth:`user_index`).
        k : int
            How many items; fewer when the user has rated all but fewer than ``k`` items.

        Returns
        -------
        list of Recommendation

        Raises
        ------
        UnknownId
            The run's data holds no such user.
        """
        u = self.user_index(raw_user_id)
        # One sample whose target (-1) is no item: the kernel removes nothing from the row.
        sample = Samples(np.array([u], dtype=np.int32), np.array([-1], dtype=np.int32))
        assembler = BatchAssembler(self.history, sample, 1, allow_no_target=True)
        X, _ = assembler.assemble(assembler.to_device_indices(np.zeros(1, dtype=np.int64)))
        scores = self.model(X)[0]
        seen = torch.as_tensor(self.history.row(u).astype(np.int64), device=scores.device)
        scores[seen] = -torch.inf
        k = min(k, self.table.n_items - len(seen))
        top = torch.topk(scores, k)  # ties: torch.topk order; deterministic on one device
        titles = self.table.item_titles
        return [
            Recommendation(
                rank=r + 1,
                item_id=self.table.item_ids[i].item(),
                title=str(titles[i]) if titles is not None else "",
                score=float(s),
            )
            for r, (s, i) in enumerate(zip(top.values.cpu().tolist(), top.indices.cpu().tolist()))
        ]
