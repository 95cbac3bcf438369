"""The candidate generator of Covington et al. (RecSys 2016, section 3), as the seed notebook built it.

Its first layer takes either a dense input row (``forward``) or the same row as ``EmbeddingBag`` inputs
(``forward_bags``, built by ``gpu_ann.bags``), with one set of weights for both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpu_ann.optim import LazyAdam

N_FEATURES = 3  # w/n, sqrt(w/n), (w/n)**2 after the item columns


class FirstLayer(nn.Module):
    """``n + 3 -> h0`` without bias or activation, stored as an item table and the count features' weight.

    On a row holding ``v_k / w`` at the user's items ``k`` and the count features ``c``, the layer is
    ``sum_k (v_k / w) * item_table[k] + feature_weight @ c``: the paper's averaged watch vector. The table is
    ``[n_items, h0]`` so that the sparse path gathers whole rows (``embedding_bag``); the dense path is the
    same map as ``nn.Linear(n_items + 3, h0, bias=False)`` with weight ``[item_table.T | feature_weight]``.
    State dicts of that older layout (one ``weight`` of shape ``[h0, n_items + 3]``) still load.

    Parameters
    ----------
    n_items : int
        Number of item columns.
    embedding_dim : int
        Output width ``h0``.

    Attributes
    ----------
    item_table : torch.nn.Parameter
        ``[n_items, embedding_dim]``, one embedding per item.
    feature_weight : torch.nn.Parameter
        ``[embedding_dim, 3]``, the weight of the three count features.
    in_features, out_features : int
        ``n_items + 3`` and ``embedding_dim``, as for the ``nn.Linear`` it replaces.
    """

    def __init__(self, n_items: int, embedding_dim: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.embedding_dim = embedding_dim
        self.in_features = n_items + N_FEATURES
        self.out_features = embedding_dim
        self.item_table = nn.Parameter(torch.empty(n_items, embedding_dim))
        self.feature_weight = nn.Parameter(torch.empty(embedding_dim, N_FEATURES))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, drawn in its ``[h0, n + 3]`` layout: a seed gives the older values."""
        weight = torch.empty(self.embedding_dim, self.in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        with torch.no_grad():
            self.item_table.copy_(weight[:, : self.n_items].T)
            self.feature_weight.copy_(weight[:, self.n_items :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on dense rows.

        Parameters
        ----------
        x : torch.Tensor
            ``[B, n_items + 3]``.

        Returns
        -------
        torch.Tensor
            ``[B, embedding_dim]``.
        """
        n = self.n_items
        # The item columns are a strided view: BLAS takes it as it is (row stride n + 3), no copy.
        return torch.matmul(x[..., :n], self.item_table) + F.linear(x[..., n:], self.feature_weight)

    def bags(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor,
        features: torch.Tensor,
        sparse_grad: bool = False,
    ) -> torch.Tensor:
        """The layer on rows given as bags: equal to :meth:`forward` on the densified rows.

        Parameters
        ----------
        indices : torch.Tensor
            ``[total]`` int64 item indices, bag after bag.
        offsets : torch.Tensor
            ``[B + 1]`` int64 bag boundaries, ``offsets[B] == total``.
        weights : torch.Tensor
            ``[total]`` per-sample weights ``v_k / w``.
        features : torch.Tensor
            ``[B, 3]`` count features.
        sparse_grad : bool
            Give :attr:`item_table` a sparse gradient holding only the rows in ``indices`` (for
            :class:`gpu_ann.optim.LazyAdam`), instead of a dense ``[n_items, embedding_dim]`` one. That
            gradient's row indices are ``indices`` itself, not a copy: with a loader's reused buffer, step
            the optimiser before the next batch is assembled (as ``gpu_ann.training`` does), or the
            gradient names the next batch's rows.

        Returns
        -------
        torch.Tensor
            ``[B, embedding_dim]``; an empty bag contributes zeros.
        """
        table = self.item_table
        # sparse=True: torch builds the gradient on ``indices`` without copying them (8 bytes an entry saved a
        # step); the trainer reads it (average, optimiser step) before the loader refills the buffer.
        items = F.embedding_bag(
            indices,
            table,
            offsets,
            mode="sum",
            per_sample_weights=weights.to(table.dtype),
            include_last_offset=True,
            sparse=sparse_grad,
        )
        return items + F.linear(features.to(self.feature_weight.dtype), self.feature_weight)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Also accept the older ``nn.Linear`` layout: ``weight [h0, n + 3]`` is split into the two parameters."""
        # ``Module.load_state_dict`` hands each module its own shallow copy of the dict: editing it is local.
        old = state_dict.pop(prefix + "weight", None)
        if old is not None:
            if tuple(old.shape) != (self.embedding_dim, self.in_features):
                error_msgs.append(
                    f"size mismatch for {prefix}weight: the checkpoint's first layer is {tuple(old.shape)}, "
                    f"this model's is {(self.embedding_dim, self.in_features)} (h0 x n_items + 3)"
                )
            else:
                state_dict.setdefault(prefix + "item_table", old[:, : self.n_items].T.contiguous())
                state_dict.setdefault(prefix + "feature_weight", old[:, self.n_items :].contiguous())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CandidateGenerator(nn.Module):
    """``n+3 -> h0 (no bias, no activation) -> h1 ReLU -> h2 ReLU -> n`` logits over the items.

    The first layer has no bias and no activation: on a row holding ``1/w`` at the user's items it is
    the mean of those items' embeddings (the paper's averaged watch vector) plus the count features'
    contribution. It takes dense rows (:meth:`forward`) or the same rows as bags (:meth:`forward_bags`);
    :meth:`hidden` / :meth:`hidden_bags` stop before the output layer, for losses that need logits of a
    few items only (``out.weight`` / ``out.bias`` hold every item's output vector and bias). The defaults
    ``hidden=(256, 512, 256)`` are the seed's.

    Parameters
    ----------
    n_items : int
        Catalogue size: the input has ``n_items + 3`` columns and the output ``n_items`` logits.
    hidden : tuple of three ints
        Widths ``(h0, h1, h2)``; ``h0`` is the item embedding size.

    Attributes
    ----------
    hidden_sizes : tuple of three ints
        ``hidden`` as given.

    Raises
    ------
    ValueError
        ``n_items`` is less than 1.
    """

    def __init__(self, n_items: int, hidden: tuple[int, int, int] = (256, 512, 256)) -> None:
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        h0, h1, h2 = hidden
        self.n_items = n_items
        self.hidden_sizes = tuple(hidden)
        self.embed = FirstLayer(n_items, h0)
        self.mlp = nn.Sequential(nn.Linear(h0, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())
        self.out = nn.Linear(h2, n_items)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (the user vector, before :attr:`out`) for dense input rows.

        Parameters
        ----------
        x : torch.Tensor
            ``[B, n_items + 3]`` rows as built by the batch assembler, on the model's device and in
            its parameters' dtype.

        Returns
        -------
        torch.Tensor
            ``[B, h2]``.
        """
        return self.mlp(self.embed(x))

    def hidden_bags(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor,
        features: torch.Tensor,
        sparse_grad: bool = False,
    ) -> torch.Tensor:
        """The last hidden layer for rows given as bags (``gpu_ann.bags.BagAssembler``).

        Parameters
        ----------
        indices, offsets, weights, features : torch.Tensor
            The first four fields of a ``gpu_ann.bags.Bags`` batch (see :meth:`FirstLayer.bags`).
        sparse_grad : bool
            A sparse gradient for the item table (see :meth:`FirstLayer.bags`).

        Returns
        -------
        torch.Tensor
            ``[B, h2]``, equal to :meth:`hidden` on the densified rows.
        """
        return self.mlp(self.embed.bags(indices, offsets, weights, features, sparse_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the items for a batch of input rows.

        Parameters
        ----------
        x : torch.Tensor
            ``[B, n_items + 3]`` rows as built by the batch assembler, on the model's device and in
            its parameters' dtype.

        Returns
        -------
        torch.Tensor
            ``[B, n_items]`` unnormalised logits (apply softmax / cross-entropy outside).
        """
        return self.out(self.hidden(x))

    def forward_bags(
        self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Logits over the items for rows given as bags: the sparse twin of :meth:`forward`.

        Parameters
        ----------
        indices, offsets, weights, features : torch.Tensor
            The first four fields of a ``gpu_ann.bags.Bags`` batch.

        Returns
        -------
        torch.Tensor
            ``[B, n_items]`` unnormalised logits, equal to :meth:`forward` on the densified rows.
        """
        return self.out(self.hidden_bags(indices, offsets, weights, features))

    @classmethod
    def from_checkpoint(cls, ckpt, device: torch.device) -> CandidateGenerator:
        """The best model of a run, on ``device``, in eval mode.

        Parameters
        ----------
        ckpt : gpu_ann.checkpoint.Checkpoint
            A loaded ``model.pt`` (its config gives the hidden sizes); either first-layer layout.
        device : torch.device
            Where the model should live.
        """
        model = cls(len(ckpt.model_state["out.bias"]), tuple(ckpt.config["hidden"]))
        model.load_state_dict(ckpt.model_state)
        return model.to(device).eval()

    def configure_optimizer(self, lr: float = 1e-3, lazy: tuple[str, ...] = ()) -> torch.optim.Optimizer | LazyAdam:
        """Adam with the seed's settings (betas 0.9 / 0.999), or lazy Adam for the item tables.

        Plain Adam's ``load_state_dict`` also takes the state of a run saved with the older one-matrix first
        layer (the moments of that matrix are split as the weights are).

        Parameters
        ----------
        lr : float
            Learning rate.
        lazy : tuple of str
            Parameters to update lazily (only the rows of each step's sparse gradient,
            :class:`gpu_ann.optim.LazyAdam`); their gradients must be sparse, which
            ``hidden_bags(..., sparse_grad=True)`` makes the item table's and
            ``gpu_ann.sampled.sampled_softmax_loss(..., sparse_grad=True)`` the output layer's
            (:func:`gpu_ann.optim.lazy_parameter_names` names them for a path and a softmax). Empty: plain Adam.

        Returns
        -------
        torch.optim.Adam or gpu_ann.optim.LazyAdam
            An optimiser over all of the model's parameters.
        """
        if lazy:
            return LazyAdam(self.named_parameters(), lazy, lr=lr, betas=(0.9, 0.999))
        optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))
        optimizer.register_load_state_dict_pre_hook(self._split_old_first_layer_state)
        return optimizer

    def _split_old_first_layer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict | None:
        """Map an older run's optimiser state (one ``[h0, n + 3]`` first-layer parameter) onto this parameter order."""
        if "lazy_names" in state_dict:  # torch would fail on the missing key with a bare KeyError
            raise ValueError(
                f"the saved optimiser state is lazy Adam's (lazy tables {list(state_dict['lazy_names'])}); "
                "this optimiser is Adam: was the run trained with --optimizer lazy-adam or auto?"
            )
        groups = state_dict["param_groups"]
        n_now = sum(len(g["params"]) for g in optimizer.param_groups)
        if len(groups) != 1 or len(optimizer.param_groups) != 1 or len(groups[0]["params"]) != n_now - 1:
            return None  # not the older layout: load_state_dict reports any other mismatch itself
        n, old_shape = self.n_items, (self.embed.embedding_dim, self.embed.in_features)

        def part(value, columns, transpose):
            if not (torch.is_tensor(value) and tuple(value.shape) == old_shape):
                # Scalars such as Adam's step: each parameter gets its own copy, since Adam updates it in place.
                return value.clone() if torch.is_tensor(value) else value
            value = value[:, columns]
            return (value.T if transpose else value).contiguous()

        state = {}
        for position, old_id in enumerate(groups[0]["params"]):
            entry = state_dict["state"].get(old_id)
            if entry is None:
                continue
            if position == 0:  # embed.weight -> embed.item_table, embed.feature_weight
                state[0] = {k: part(v, slice(0, n), True) for k, v in entry.items()}
                state[1] = {k: part(v, slice(n, None), False) for k, v in entry.items()}
            else:
                state[position + 1] = entry
        group = {k: v for k, v in groups[0].items() if k != "param_names"}
        group["params"] = list(range(n_now))
        return {"state": state, "param_groups": [group]}
