"""Top-K items for a user of a trained run, or for a new user given as items, in raw ids with titles."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpu_ann.backend import get_backend
from gpu_ann.batching import BatchAssembler
from gpu_ann.checkpoint import load_checkpoint, load_data
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.scoring import top_k
from gpu_ann.splits import Samples
from gpu_ann.values import fit_values


class UnknownId(KeyError):
    """A raw user or item id (or item title) that the run's data does not hold."""


class AmbiguousTitle(UnknownId):
    """An item title that names several items of the run's data; the message lists their ids."""


@dataclass
class Recommendation:
    """One ranked item of :meth:`Recommender.for_user` or :meth:`Recommender.for_items`.

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
    """A trained model with its run's data, ready to rank items for known users and for new ones.

    The model is user-free: its input is a row of items. For a known user that row is everything the
    user has rated (all splits); for a new user (:meth:`for_items`) it is the items given. Either row
    is built by the training kernel (normalised exactly as in training), and its items are excluded
    from the ranking. Equal scores are ranked by the lower item index.

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
        self.table, assignment = load_data(Path(run_dir))
        ckpt = load_checkpoint(Path(run_dir), self.table)
        self.model = CandidateGenerator.from_checkpoint(ckpt, self.backend.torch_device)
        # Values fitted on the run's input interactions, as in training; a known user's row holds all
        # their interactions, valued the same way.
        self.values = fit_values(ckpt.config.get("input_values", "implicit"), self.table, assignment)
        t = self.table
        self.history = InteractionMatrix.from_pairs(
            self.backend, t.user, t.item, t.n_users, t.n_items, values=self.values.of(t.user, t.item, t.rating)
        )
        self._user_index = {raw: i for i, raw in enumerate(self.table.user_ids.tolist())}
        # Items by the decimal text of their id (str() of an int id, the id itself for text ids).
        self._item_by_text = {str(raw): i for i, raw in enumerate(self.table.item_ids.tolist())}
        self._items_by_title: dict[str, list[int]] = {}
        if self.table.item_titles is not None:
            for i, title in enumerate(self.table.item_titles.tolist()):
                if title:
                    self._items_by_title.setdefault(title.casefold(), []).append(i)

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
        """The ``k`` highest-scoring items the user has not rated, best first, equal scores by lower item index.

        The input row is everything the user has rated (all splits); :meth:`for_items` with those items
        gives the same list. Runs without autograd; reading the user's row and the top ``k`` back to the host syncs with
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
        return self._rank_row(self.history, sample, self.history.row(u), k)

    def item_index(self, entry: str) -> int:
        """The index of an item given as its raw id or its title.

        An exact match of the id's text comes first (ids read as integers match their decimal form,
        ``"7"`` but not ``"007"``), then an exact title match ignoring case.

        Parameters
        ----------
        entry : str
            A raw item id as in the ratings file, or an item title.

        Returns
        -------
        int
            Column index of the item in the run's data.

        Raises
        ------
        UnknownId
            Neither an id nor a title of the run's data; the message suggests up to three close titles.
        AmbiguousTitle
            The title names several items (and is no id); the message lists their ids.
        """
        text = str(entry)
        if text in self._item_by_text:
            return self._item_by_text[text]
        matches = self._items_by_title.get(text.casefold(), [])
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(str(self.table.item_ids[i].item()) for i in matches)
            raise AmbiguousTitle(f"item title {text!r} names {len(matches)} items (ids {ids}): give one by its id")
        raise UnknownId(f"item {text!r} is neither an item id nor a title in the run's data; {self._suggest(text)}")

    def _suggest(self, text: str) -> str:
        """Up to three close titles (or ids, where the data has no titles), as the end of an error message."""
        if self._items_by_title:
            titles = self.table.item_titles.tolist()
            by_folded: dict[str, str] = {}
            for title in titles:
                if title:
                    by_folded.setdefault(title.casefold(), title)
            close = difflib.get_close_matches(text.casefold(), list(by_folded), n=3)
            what, found = "titles", [by_folded[c] for c in close]
        else:
            what, found = "ids", difflib.get_close_matches(text, list(self._item_by_text), n=3)
        if not found:
            return f"no close {what}"
        return f"close {what}: " + ", ".join(repr(f) for f in found)

    @torch.no_grad()
    def for_items(self, items: Sequence[str], k: int = 10) -> list[Recommendation]:
        """The ``k`` highest-scoring items for a new user who has the given items, best first.

        No retraining: the model is user-free. The input row is the given items (each once), built by
        the training kernel exactly as a known user's row is, with no target removed; the given items
        are excluded from the ranking.

        Parameters
        ----------
        items : sequence of str
            The new user's items, each a raw item id or a title (see :meth:`item_index`); repeats count
            once. An empty sequence ranks from the count features alone.
        k : int
            How many items; fewer when fewer than ``k`` items are left to recommend.

        Returns
        -------
        list of Recommendation

        Raises
        ------
        UnknownId
            An entry is neither an item id nor a title of the run's data (close titles suggested).
        AmbiguousTitle
            An entry is a title shared by several items.
        """
        if isinstance(items, str):
            raise TypeError("items must be a list of item ids or titles, not one string")
        row = np.unique(np.array([self.item_index(entry) for entry in items], dtype=np.int32))
        # A one-row CSR of the items, and one sample of that row whose target (-1) is no item.
        # Listed items carry no rating: each gets the mode's value of an unscored interaction.
        users = np.zeros(len(row), dtype=np.int32)
        values = self.values.of(users, row, None)
        matrix = InteractionMatrix.from_pairs(self.backend, users, row, 1, self.table.n_items, values=values)
        sample = Samples(np.zeros(1, dtype=np.int32), np.array([-1], dtype=np.int32))
        return self._rank_row(matrix, sample, row, k)

    def _rank_row(
        self, matrix: InteractionMatrix, sample: Samples, exclude: np.ndarray, k: int
    ) -> list[Recommendation]:
        """Assemble the one sample's row with the training kernel, score it, and rank all but ``exclude``."""
        assembler = BatchAssembler(matrix, sample, 1, allow_no_target=True)
        X, _ = assembler.assemble(assembler.to_device_indices(np.zeros(1, dtype=np.int64)))
        scores = self.model(X)[0].float()
        seen = torch.as_tensor(np.asarray(exclude).astype(np.int64), device=scores.device)
        scores[seen] = -torch.inf
        # A stable descending sort: equal scores are ranked by the lower item index, as in gpu_ann.ranking.
        index, value, valid = top_k(scores[None], k)
        n = int(valid[0].sum())
        titles = self.table.item_titles
        return [
            Recommendation(
                rank=r + 1,
                item_id=self.table.item_ids[i].item(),
                title=str(titles[i]) if titles is not None else "",
                score=float(s),
            )
            for r, (s, i) in enumerate(zip(value[0, :n].cpu().tolist(), index[0, :n].cpu().tolist()))
        ]
