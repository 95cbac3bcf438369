"""The model on an assembled batch equals the paper's averaged embedding, computed per sample by hand.

Also: the first layer's split layout (item table + count features' weight) loads and resumes what the older
single ``nn.Linear(n + 3, h0, bias=False)`` saved, and a seed draws the same initial weights as it did.
"""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import hand_case
from torch import nn

from gpu_ann.kernels.assemble import assemble_rows
from gpu_ann.model import CandidateGenerator


class OlderGenerator(nn.Module):
    """The model as runs saved it before the first layer was split: one ``nn.Linear(n + 3, h0, bias=False)``."""

    def __init__(self, n_items, hidden):
        super().__init__()
        h0, h1, h2 = hidden
        self.embed = nn.Linear(n_items + 3, h0, bias=False)
        self.mlp = nn.Sequential(nn.Linear(h0, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())
        self.out = nn.Linear(h2, n_items)

    def forward(self, x):
        return self.out(self.mlp(self.embed(x)))


def older_weights(model: CandidateGenerator) -> dict[str, torch.Tensor]:
    """``model``'s weights in the older layout: the first layer as one ``[h0, n + 3]`` matrix."""
    state = dict(model.state_dict())
    state["embed.weight"] = torch.cat([state.pop("embed.item_table").T, state.pop("embed.feature_weight")], dim=1)
    return state


def saved_and_loaded(state: dict) -> dict:
    """A state dict through ``torch.save`` / ``torch.load``, as a checkpoint holds it (no tensor shared)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_dense_first_layer_is_the_mean_item_embedding_plus_count_features():
    indptr, indices, users, items, n = hand_case()
    batch = np.arange(len(users), dtype=np.int64)
    out = np.empty((len(batch), n + 3), np.float32)
    labels = np.empty(len(batch), np.int64)
    assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, out, labels)
    torch.manual_seed(0)
    model = CandidateGenerator(n, hidden=(6, 5, 4)).double()
    E = model.embed.item_table.detach().numpy()  # [n, 6]: one embedding per item
    Fw = model.embed.feature_weight.detach().numpy()  # [6, 3]
    got = model.embed(torch.from_numpy(out).double()).detach().numpy()
    for r, (u, t) in enumerate(zip(users, items)):
        row = [i for i in indices[indptr[u] : indptr[u + 1]] if i != t]
        w = max(len(row), 1)
        mean_embedding = E[row].sum(axis=0) / w if row else np.zeros(6)
        f = w / n
        expected = mean_embedding + Fw[:, 0] * f + Fw[:, 1] * np.sqrt(f) + Fw[:, 2] * f * f
        np.testing.assert_allclose(got[r], expected, rtol=1e-6, atol=1e-9)


def test_shapes_and_layers_follow_the_seed():
    model = CandidateGenerator(100)
    assert model.embed.in_features == 103 and model.embed.out_features == 256
    assert [(name, tuple(p.shape)) for name, p in model.embed.named_parameters()] == [
        ("item_table", (100, 256)),
        ("feature_weight", (256, 3)),
    ]  # no bias
    assert [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)] == [512, 256]
    assert model.out.out_features == 100 and model.hidden_sizes == (256, 512, 256)
    assert model(torch.zeros(2, 103)).shape == (2, 100)
    opt = model.configure_optimizer()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.999)


def test_hidden_then_the_output_layer_is_forward():
    torch.manual_seed(5)
    model = CandidateGenerator(12, (6, 5, 4))
    x = torch.rand(3, 15)
    h = model.hidden(x)
    assert h.shape == (3, 4)
    torch.testing.assert_close(h @ model.out.weight.T + model.out.bias, model(x), rtol=1e-6, atol=1e-7)


def test_a_seed_draws_the_older_layouts_initial_weights():
    torch.manual_seed(7)
    model = CandidateGenerator(20, (6, 5, 4))
    torch.manual_seed(7)
    older = OlderGenerator(20, (6, 5, 4))
    for name, tensor in older.state_dict().items():
        assert torch.equal(older_weights(model)[name], tensor), name


def test_an_older_state_dict_loads_and_gives_the_same_logits():
    torch.manual_seed(8)
    older = OlderGenerator(20, (6, 5, 4))
    model = CandidateGenerator(20, (6, 5, 4))
    result = model.load_state_dict(older.state_dict())  # strict: nothing missing, nothing unexpected
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(4, 23)
    torch.testing.assert_close(model(x), older(x), rtol=1e-6, atol=1e-7)
    assert torch.equal(model.embed.item_table, older.embed.weight[:, :20].T)
    wrong = OlderGenerator(21, (6, 5, 4)).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for embed.weight.*\(6, 24\).*\(6, 23\)"):
        model.load_state_dict(wrong)


def test_an_older_runs_optimiser_state_resumes_where_it_stopped():
    torch.manual_seed(9)
    older = OlderGenerator(15, (6, 5, 4))
    older_opt = torch.optim.Adam(older.parameters(), lr=1e-2, betas=(0.9, 0.999))
    x, y = torch.rand(8, 18), torch.randint(0, 15, (8,))
    for _ in range(2):
        older_opt.zero_grad()
        F.cross_entropy(older(x), y).backward()
        older_opt.step()
    model = CandidateGenerator(15, (6, 5, 4))
    model.load_state_dict(older.state_dict())
    optimizer = model.configure_optimizer(1e-2)
    optimizer.load_state_dict(saved_and_loaded(older_opt.state_dict()))
    # One more step on each: the same moments and step count give the same weights.
    for m, opt in ((older, older_opt), (model, optimizer)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for name, tensor in older.state_dict().items():
        torch.testing.assert_close(older_weights(model)[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    steps = [float(s["step"]) for s in optimizer.state_dict()["state"].values()]
    assert steps == [3.0] * 8  # the split moments do not share a step counter
    # A state of this layout loads unchanged.
    again = model.configure_optimizer(1e-2)
    again.load_state_dict(optimizer.state_dict())
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
