"""The candidate generator of Covington et al. (RecSys 2016, section 3), as the seed notebook built it."""

from __future__ import annotations

import torch
from torch import nn

N_FEATURES = 3  # w/n, sqrt(w/n), (w/n)**2 after the item columns


class CandidateGenerator(nn.Module):
    """``n+3 -> h0 (no bias, no activation) -> h1 ReLU -> h2 ReLU -> n`` logits over the items.

    The first layer has no bias and no activation: on a row holding ``1/w`` at the user's items it is
    the mean of those items' embeddings (the paper's averaged watch vector) plus the count features'
    contribution. The defaults ``hidden=(256, 512, 256)`` are the seed's.

    Parameters
    ----------
    n_items : int
        Catalogue size: the input has ``n_items + 3`` columns and the output ``n_items`` logits.
    hidden : tuple of three ints
        Widths ``(h0, h1, h2)``; ``h0`` is the item embedding size.

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
        self.hidden = tuple(hidden)
        self.embed = nn.Linear(n_items + N_FEATURES, h0, bias=False)
        self.mlp = nn.Sequential(nn.Linear(h0, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())
        self.out = nn.Linear(h2, n_items)

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
        return self.out(self.mlp(self.embed(x)))

    @classmethod
    def from_checkpoint(cls, ckpt, device: torch.device) -> CandidateGenerator:
        """The best model of a run, on ``device``, in eval mode.

        Parameters
        ----------
        ckpt : gpu_ann.checkpoint.Checkpoint
            A loaded ``model.pt`` (its config gives the hidden sizes).
        device : torch.device
            Where the model should live.
        """
        model = cls(len(ckpt.model_state["out.bias"]), tuple(ckpt.config["hidden"]))
        model.load_state_dict(ckpt.model_state)
        return model.to(device).eval()

    def configure_optimizer(self, lr: float = 1e-3) -> torch.optim.Optimizer:
        """Adam with the seed's settings (betas 0.9 / 0.999).

        Parameters
        ----------
        lr : float
            Learning rate.

        Returns
        -------
        torch.optim.Adam
            An optimiser over all of the model's parameters.
        """
        return torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))
