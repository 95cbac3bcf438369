"""Ranking metrics over held-out items, computed on the device in batches of users.

For a user ``u`` with held-out items ``H`` (|H| > 0) and the ranked list ``R`` of items, the user's
training items removed (scored -inf, so they can never be recommended) and ties broken by the lower
item index, with ``hits@K = |R[:K] ∩ H|``:

===================  =====================================================================
``recall@K``         hits@K / min(K, |H|)  (Liang et al. 2018: 1.0 is reachable for every user)
``hit_fraction@K``   hits@K / |H|  (the plain recall, which cannot reach 1 when |H| > K)
``precision@K``      hits@K / K
``hit_rate@K``       1 if hits@K > 0 else 0
``mrr@K``            1 / (rank of the first held-out item) if it is within K, else 0
``ndcg@K``           DCG@K / IDCG@K with binary gains: DCG@K = Σ_{i ≤ K, R[i] ∈ H} 1 / log2(i + 1),
                     IDCG@K = Σ_{i ≤ min(K, |H|)} 1 / log2(i + 1), ranks i from 1
``coverage@K``       |∪_u R_u[:K]| / n_items over the evaluated users (training items excluded)
===================  =====================================================================

Each per-user metric is averaged over the users that have held-out items. When K exceeds the number of
items a user can be recommended, R[:K] holds all of them (masked items are not counted as recommended).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

PER_USER = ("recall", "hit_fraction", "precision", "hit_rate", "mrr", "ndcg")


def rows_mask(
    indptr: np.ndarray, indices: np.ndarray, users: np.ndarray, n_items: int, device: torch.device
) -> torch.Tensor:
    """A dense ``[len(users), n_items]`` bool mask of the users' CSR rows, built on ``device``.

    The row offsets are read on the host; the selected indices are copied to the device once (from
    pageable memory, so the host waits for that copy).
    """
    starts = indptr[users].astype(np.int64)
    lengths = (indptr[users + 1] - starts).astype(np.int64)
    rows = np.repeat(np.arange(len(users)), lengths)
    # Position of every stored entry of the selected rows, without a Python loop over users.
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = indices[np.repeat(starts, lengths) + within].astype(np.int64)
    mask = torch.zeros((len(users), n_items), dtype=torch.bool, device=device)
    mask[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)] = True
    return mask


class RankingMetrics:
    """Accumulates the metrics above over batches of users; :meth:`result` averages them.

    Parameters
    ----------
    n_items : int
        Catalogue size (columns of the score matrices).
    ks : sequence of int
        The cut-offs K.
    device : torch.device
        Where the per-batch work happens; only the running sums cross to the host, at :meth:`result`.
    """

    def __init__(self, n_items: int, ks: Sequence[int], device: torch.device) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"cut-offs must be positive integers, got {list(ks)}")
        self.n_items, self.ks, self.device = n_items, sorted(set(ks)), device
        self.kmax = max(self.ks)
        self.sums = {f"{m}@{k}": torch.zeros((), dtype=torch.float64, device=device) for m in PER_USER for k in self.ks}
        self.recommended = {k: torch.zeros(n_items, dtype=torch.bool, device=device) for k in self.ks}
        self.users = 0
        # 1 / log2(i + 1) for ranks i = 1..kmax
        self._discount = 1.0 / torch.log2(torch.arange(2, self.kmax + 2, device=device, dtype=torch.float64))

    def update(self, scores: torch.Tensor, seen: torch.Tensor, heldout: torch.Tensor) -> None:
        """Add a batch: ``scores [B, n]``, and bool masks ``seen`` (excluded) and ``heldout`` of the same shape."""
        keep = heldout.any(dim=1)  # only users with held-out items count
        if not bool(keep.any()):  # host-device sync, once per batch
            return
        # Boolean indexing sizes its result on the host: three more syncs, once per batch.
        scores, seen, heldout = scores[keep], seen[keep], heldout[keep]
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # float64 scores (baselines) stay float64: no ties that are not there
        masked = scores.masked_fill(seen, float("-inf"))
        k = min(self.kmax, self.n_items)
        # A stable descending sort ranks equal scores by the lower item index: deterministic ties.
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
        valid = torch.gather(masked, 1, order) > float("-inf")  # masked items are never recommended
        hit = torch.gather(heldout, 1, order) & valid
        n_held = heldout.sum(dim=1).double()
        first_hit = torch.where(hit.any(dim=1), hit.double().argmax(dim=1) + 1, torch.zeros_like(n_held).long())
        for K in self.ks:
            hits = hit[:, :K].sum(dim=1).double()
            dcg = (hit[:, :K].double() * self._discount[: min(K, k)]).sum(dim=1)
            ideal_n = torch.clamp(n_held, max=K).long()
            idcg = torch.cumsum(self._discount, 0)[torch.clamp(ideal_n, max=self.kmax) - 1]
            self.sums[f"recall@{K}"] += (hits / torch.clamp(n_held, max=K)).sum()
            self.sums[f"hit_fraction@{K}"] += (hits / n_held).sum()
            self.sums[f"precision@{K}"] += (hits / K).sum()
            self.sums[f"hit_rate@{K}"] += (hits > 0).double().sum()
            self.sums[f"mrr@{K}"] += torch.where(
                (first_hit > 0) & (first_hit <= K), 1.0 / first_hit.double(), 0.0
            ).sum()
            self.sums[f"ndcg@{K}"] += (dcg / idcg).sum()
            rec = order[:, :K][valid[:, :K]]  # boolean indexing: a host-device sync per K
            self.recommended[K][rec] = True
        self.users += int(keep.sum())  # host-device sync, once per batch

    def result(self) -> dict[str, float]:
        """The averages over evaluated users (NaN when none had held-out items), and coverage."""
        out = {name: (float(total) / self.users if self.users else float("nan")) for name, total in self.sums.items()}
        for K in self.ks:
            out[f"coverage@{K}"] = float(self.recommended[K].sum()) / self.n_items
        out["users"] = self.users
        return out


def evaluate_scores(
    score_batch: Callable[[np.ndarray], torch.Tensor],
    n_users: int,
    n_items: int,
    seen: tuple[np.ndarray, np.ndarray],
    heldout: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int],
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """Ranking metrics of a scorer over all users with held-out items, in batches of users.

    Parameters
    ----------
    score_batch : callable
        ``score_batch(users) -> scores [len(users), n_items]`` on ``device`` (a model, a baseline).
    n_users, n_items : int
        Matrix shape.
    seen, heldout : (indptr, indices)
        Host CSR structure of the items excluded from ranking (training) and of the held-out items.
    ks : sequence of int
        Cut-offs.
    device : torch.device
        Where scores live.
    batch_size : int
        Users per batch: never a full users x items matrix at once.
    """
    metrics = RankingMetrics(n_items, ks, device)
    users = np.flatnonzero(np.diff(heldout[0]) > 0)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        with torch.no_grad():
            scores = score_batch(batch)
        metrics.update(scores, rows_mask(*seen, batch, n_items, device), rows_mask(*heldout, batch, n_items, device))
    return metrics.result()
