"""Input value modes (implicit, rating, residual): fitted on inputs only, through the kernel end to end."""

import numpy as np
import pytest
from reference import assemble_reference

from gpu_ann.backend import get_backend
from gpu_ann.baselines import Biases
from gpu_ann.batching import BatchAssembler
from gpu_ann.data.table import DataError, RatingsTable
from gpu_ann.splits import FOLD_IN, TEST, TRAIN, VALIDATION, Samples
from gpu_ann.values import fit_values, input_matrix


def table_with(rating):
    # 3 users x 4 items:   item 0   1    2    3
    #   user 0 (idx 0-2)      8    -    6    NaN(unrated)
    #   user 1 (idx 3-5)      -    4    10   2
    #   user 2 (idx 6-7)      5    -    -    9
    user = np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32)
    item = np.array([0, 2, 3, 1, 2, 3, 0, 3], np.int32)
    return RatingsTable(
        user=user,
        item=item,
        rating=rating,
        timestamp=None,
        user_ids=np.array([10, 11, 12]),
        item_ids=np.array([20, 21, 22, 23]),
        item_titles=None,
        source="hand",
    )


RATINGS = np.array([8, 6, np.nan, 4, 10, 2, 5, 9], np.float32)
# Interactions 5 (user 1, item 3) and 7 (user 2, item 3) are held out; 6 is a fold-in input.
ASSIGNMENT = np.array([TRAIN, TRAIN, TRAIN, TRAIN, TRAIN, VALIDATION, FOLD_IN, TEST], np.int8)


def test_rating_mode_by_hand():
    table = table_with(RATINGS)
    model = fit_values("rating", table, ASSIGNMENT)
    # Input ratings (train + fold-in, rated): 8, 6, 4, 10, 5 -> scale 10, mean 6.6; the held-out 2 and 9
    # must not count (9 would not change the scale, but 2 would change the mean).
    assert model.scale == 10.0
    assert model.fill == pytest.approx(0.66)
    values = model.of(table.user, table.item, table.rating)
    np.testing.assert_allclose(values, [0.8, 0.6, 0.66, 0.4, 1.0, 0.2, 0.5, 0.9], rtol=1e-6)


def test_residual_mode_matches_the_bias_baseline_fitted_on_inputs_only():
    table = table_with(RATINGS)
    model = fit_values("residual", table, ASSIGNMENT)
    rated_inputs = np.array([0, 1, 3, 4, 6])
    biases = Biases().fit(
        table.user[rated_inputs], table.item[rated_inputs], RATINGS[rated_inputs], 3, 4, get_backend("cpu")
    )
    assert biases.global_mean == pytest.approx(6.6)
    values = model.of(table.user, table.item, table.rating)
    expected = (RATINGS.astype(np.float64) - biases.predict(table.user, table.item)) / 10.0
    expected[2] = 0.0  # unrated: no residual
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-7)
    # Changing a held-out rating changes nothing about the inputs' values.
    other = RATINGS.copy()
    other[[5, 7]] = [1, 1]
    again = fit_values("residual", table_with(other), ASSIGNMENT).of(table.user, table.item, other)
    inputs = np.isin(ASSIGNMENT, (TRAIN, FOLD_IN))
    np.testing.assert_array_equal(again[inputs], values[inputs])


def test_input_matrix_holds_the_inputs_with_their_values_and_feeds_the_kernel():
    table = table_with(RATINGS)
    cpu = get_backend("cpu")
    matrix = input_matrix(cpu, table, ASSIGNMENT, "rating")
    dense = matrix.csr.toarray()
    expected = np.zeros((3, 4), np.float32)
    expected[[0, 0, 0, 1, 1, 2], [0, 2, 3, 1, 2, 0]] = [0.8, 0.6, 0.66, 0.4, 1.0, 0.5]
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    # Rows through the assembler match the reference built from the same values.
    samples = Samples(np.array([0, 1, 2, 1], np.int32), np.array([2, 3, 3, 1], np.int32))
    X, y = BatchAssembler(matrix, samples, 4).assemble(np.arange(4, dtype=np.int64))
    ref, ref_y = assemble_reference(
        matrix.indptr, matrix.indices, samples.user, samples.item, np.arange(4), 4, values=matrix.values
    )
    np.testing.assert_allclose(X.numpy(), ref, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), ref_y)
    # Sample 0 by hand: user 0 without its target 2 keeps items 0 (0.8) and 3 (unrated: 0.66), w = 2.
    np.testing.assert_allclose(X[0, :4].numpy(), [0.4, 0, 0, 0.33], rtol=1e-6)


def test_implicit_mode_stores_no_values_and_explicit_modes_need_ratings():
    implicit = table_with(None)
    matrix = input_matrix(get_backend("cpu"), implicit, ASSIGNMENT, "implicit")
    assert matrix.values is None and matrix.nnz == 6
    for mode in ("rating", "residual"):
        with pytest.raises(DataError, match=f"'{mode}' need ratings"):
            fit_values(mode, implicit, ASSIGNMENT)
    with pytest.raises(ValueError, match="unknown input value mode 'ratings'"):
        fit_values("ratings", implicit, ASSIGNMENT)


def test_a_stored_value_of_zero_still_marks_a_seen_item():
    # User 0's only training rating equals the bias prediction exactly when every rating is the same.
    table = table_with(np.full(8, 7, np.float32))
    matrix = input_matrix(get_backend("cpu"), table, ASSIGNMENT, "residual")
    assert np.all(matrix.values == 0)
    assert matrix.nnz == 6  # every input interaction is still in the structure
    samples = Samples(np.array([0], np.int32), np.array([1], np.int32))
    X, _ = BatchAssembler(matrix, samples, 1).assemble(np.zeros(1, np.int64))
    # w = 3 items (0, 2, 3), all valued 0; the count features see them.
    assert X[0, :4].abs().sum() == 0
    np.testing.assert_allclose(X[0, 4:].numpy(), [0.75, np.sqrt(0.75), 0.5625], rtol=1e-6)


def test_training_evaluating_and_recommending_in_residual_mode(tmp_path):
    from test_train import real_slice

    from gpu_ann.data.readers import load_bundled_anime
    from gpu_ann.evaluate import evaluate_run
    from gpu_ann.recommend import Recommender
    from gpu_ann.training import TrainConfig, train

    table = real_slice(load_bundled_anime(), 300, 120)
    cfg = TrainConfig(
        backend="cpu",
        out=str(tmp_path / "run"),
        input_values="residual",
        batch_size=128,
        hidden=(16, 32, 16),
        eval_every=10,
        eval_batches=2,
        max_steps=20,
        seed=1,
    )
    result = train(cfg, table)
    assert result.config.input_values == "residual"
    report = evaluate_run(tmp_path / "run", "test", backend="cpu", ks=(10,))
    assert np.isfinite(report["loss"]) and 0 <= report["ranking"]["model"]["recall@10"] <= 1
    rec = Recommender(tmp_path / "run")
    assert rec.values.mode == "residual" and rec.values.fill == 0.0
    listed = [str(i) for i in table.item_ids[:3]]
    picks = rec.for_items(listed, k=5)
    assert len(picks) == 5 and not {str(p.item_id) for p in picks} & set(listed)
