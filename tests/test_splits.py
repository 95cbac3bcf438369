import numpy as np
import pytest

from gpu_ann.data.table import DataError, RatingsTable
from gpu_ann.splits import random_split


def table_of(n):
    rng = np.random.default_rng(0)
    return RatingsTable(
        user=rng.integers(0, 50, n).astype(np.int32),
        item=rng.integers(0, 40, n).astype(np.int32),
        rating=None,
        timestamp=None,
        user_ids=np.arange(50),
        item_ids=np.arange(40),
        item_titles=None,
        source="t.csv",
    )


def test_random_split_is_seeded_disjoint_and_sized():
    table = table_of(1000)
    splits, assignment = random_split(table, (0.8, 0.1, 0.1), seed=4)
    assert np.bincount(assignment).tolist() == [800, 100, 100]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (800, 100, 100)
    np.testing.assert_array_equal(splits.validation.item, table.item[assignment == 1])
    again, same = random_split(table, (0.8, 0.1, 0.1), seed=4)
    np.testing.assert_array_equal(assignment, same)
    _, other = random_split(table, (0.8, 0.1, 0.1), seed=5)
    assert not np.array_equal(assignment, other)


@pytest.mark.parametrize("fractions", [(0.8, 0.3, 0.1), (0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        random_split(table_of(10), fractions)


def test_too_small_to_train():
    with pytest.raises(DataError, match="t.csv: 2 interactions give 2 training and 0 validation"):
        random_split(table_of(2), (0.8, 0.1, 0.1))
