"""Intervals that respect slides, Wilson's interval, Cohen's κ — checked against known values."""

import math

import numpy as np
import pytest

from chatexaonepath.eval.stats import agreement_table, cluster_bootstrap, cohen_kappa, wilson_interval


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(63, 100)
    assert (low, high) == pytest.approx((0.5322, 0.7181), abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # never below 0, unlike Wald
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) is None


def test_with_one_question_per_slide_the_cluster_bootstrap_is_the_ordinary_one():
    outcomes = [1.0] * 63 + [0.0] * 37
    low, high = cluster_bootstrap(outcomes, [f"s{i}" for i in range(100)])
    half = 1.96 * math.sqrt(0.63 * 0.37 / 100)
    assert low == pytest.approx(0.63 - half, abs=0.015) and high == pytest.approx(0.63 + half, abs=0.015)
    assert cluster_bootstrap(outcomes, [f"s{i}" for i in range(100)]) == (low, high)  # seeded


def test_questions_sharing_a_slide_widen_the_interval():
    # 25 slides × 4 questions, each slide's questions all right or all wrong: 25 independent outcomes, not 100.
    outcomes = [1.0] * 64 + [0.0] * 36
    clustered = cluster_bootstrap(outcomes, [f"s{i // 4}" for i in range(100)])
    naive = cluster_bootstrap(outcomes, [f"q{i}" for i in range(100)])
    assert (clustered[1] - clustered[0]) > 1.6 * (naive[1] - naive[0])  # ≈ √4 = 2 times wider


def test_paired_differences_and_degenerate_cases():
    with_slide, without = [1.0] * 60 + [0.0] * 40, [1.0] * 40 + [0.0] * 60
    low, high = cluster_bootstrap(with_slide, [f"s{i % 30}" for i in range(100)], paired=without)
    assert low < 0.2 < high and low > 0
    assert cluster_bootstrap([1.0, 0.0], ["one", "one"]) is None  # one slide: no honest interval
    with pytest.raises(ValueError):
        cluster_bootstrap([1.0], ["a", "b"])


def test_cohen_kappa_known_values():
    # The classic 2×2 example: 20 both yes, 15 both no, 5 + 10 disagreements → κ = 0.4
    first = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    second = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa([True, False, True], [True, False, True]) == 1.0
    assert cohen_kappa([True, True], [True, True]) is None  # chance agreement is already 1
    assert cohen_kappa([], []) is None
    table = agreement_table(first, second)
    assert (table["both_yes"], table["both_no"], table["first_only"], table["second_only"]) == (20, 15, 5, 10)
    assert table["percent_agreement"] == pytest.approx(0.7) and table["n"] == 50


def test_bootstrap_memory_stays_bounded_for_many_slides():
    rng = np.random.default_rng(0)
    outcomes = rng.integers(0, 2, 20_000).astype(float)
    low, high = cluster_bootstrap(outcomes, [f"s{i // 3}" for i in range(20_000)], resamples=2_000)
    assert 0.45 < low < high < 0.55
