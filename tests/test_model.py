"""The model on an assembled batch equals the paper's averaged embedding, computed per sample by hand."""

import numpy as np
import torch
from cases import hand_case

from gpu_ann.kernels.assemble import assemble_rows
from gpu_ann.model import CandidateGenerator


def test_dense_first_layer_is_the_mean_item_embedding_plus_count_features():
    indptr, indices, users, items, n = hand_case()
    batch = np.arange(len(users), dtype=np.int64)
    out = np.empty((len(batch), n + 3), np.float32)
    labels = np.empty(len(batch), np.int64)
    assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, out, labels)
    torch.manual_seed(0)
    model = CandidateGenerator(n, hidden=(6, 5, 4)).double()
    W = model.embed.weight.detach().numpy()  # [6, n+3]
    got = model.embed(torch.from_numpy(out).double()).detach().numpy()
    for r, (u, t) in enumerate(zip(users, items)):
        row = [i for i in indices[indptr[u] : indptr[u + 1]] if i != t]
        w = max(len(row), 1)
        mean_embedding = W[:, row].sum(axis=1) / w if row else np.zeros(6)
        f = w / n
        expected = mean_embedding + W[:, n] * f + W[:, n + 1] * np.sqrt(f) + W[:, n + 2] * f * f
        np.testing.assert_allclose(got[r], expected, rtol=1e-6, atol=1e-9)


def test_shapes_and_layers_follow_the_seed():
    model = CandidateGenerator(100)
    assert model.embed.bias is None and model.embed.in_features == 103 and model.embed.out_features == 256
    assert [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)] == [512, 256]
    assert model.out.out_features == 100
    assert model(torch.zeros(2, 103)).shape == (2, 100)
    opt = model.configure_optimizer()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.999)
