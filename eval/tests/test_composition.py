import numpy as np
import pytest

from classynet_eval.composition import CompositionError, composition

# Ten classes of 1,000 samples each, as the Fashion-MNIST test set.
LABELS = np.repeat(np.arange(10), 1000)
np.random.default_rng(1).shuffle(LABELS)


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_exact_share_and_even_rest(share):
    idx = composition(LABELS, 9, share, 10_000, seed=0)
    y = LABELS[idx]
    assert len(idx) == 10_000
    assert (y == 9).sum() == round(share * 10_000)
    rest = np.bincount(y[y != 9], minlength=9)[:9]
    assert rest.max() - rest.min() <= 1


def test_ten_percent_of_ten_thousand_is_the_test_set():
    idx = composition(LABELS, 9, 0.1, 10_000, seed=3)
    assert sorted(idx.tolist()) == list(range(10_000))


def test_repeats_only_after_every_image_is_used():
    idx = composition(LABELS, 9, 0.9, 10_000, seed=0)
    counts = np.bincount(idx[LABELS[idx] == 9], minlength=10_000)[LABELS == 9]
    assert counts.min() == 9 and counts.max() == 9


def test_seeded_and_shuffled():
    a = composition(LABELS, 9, 0.3, 2_000, seed=7)
    assert np.array_equal(a, composition(LABELS, 9, 0.3, 2_000, seed=7))
    assert not np.array_equal(a, composition(LABELS, 9, 0.3, 2_000, seed=8))
    # Shuffled: the target class is not one block at the front.
    assert (LABELS[a[:600]] == 9).sum() < 600


def test_bad_requests():
    with pytest.raises(CompositionError, match="within \\[0, 1\\]"):
        composition(LABELS, 9, 1.5, 100)
    with pytest.raises(CompositionError, match="class 12 has no samples"):
        composition(LABELS, 12, 0.5, 100)
