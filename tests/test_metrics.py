"""camkd_jax.metrics: hand-computed references for every metric, selection, seed summaries."""
import math

import numpy as np
import pytest

from camkd_jax import metrics


def test_confusion_matrix_counts_by_hand():
  labels = [0, 0, 1, 2, 2, 2]
  preds = [0, 1, 1, 2, 0, 2]
  want = [[1, 1, 0],
          [0, 1, 0],
          [1, 0, 2]]
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, 3), want)


def test_confusion_matrix_keeps_absent_classes():
  cm = metrics.confusion_matrix([1, 1], [1, 1], 4)
  assert cm.shape == (4, 4) and cm[1, 1] == 2 and cm.sum() == 2


def test_balanced_accuracy_by_hand():
  # Recalls: class 0: 1/2, class 1: 1/1, class 2: 2/3 -> mean 13/18.
  labels = [0, 0, 1, 2, 2, 2]
  preds = [0, 1, 1, 2, 0, 2]
  assert metrics.balanced_accuracy(labels, preds, 3) == pytest.approx(13 / 18, abs=1e-12)


def test_balanced_accuracy_ignores_classes_absent_from_labels():
  # Class 3 never occurs in the labels: mean recall over classes 0 and 1 only.
  assert metrics.balanced_accuracy([0, 0, 1, 1], [0, 3, 1, 1], 4) == pytest.approx(0.75)


def test_kappa_two_classes_by_hand():
  # With 2 classes the quadratic weights are the 0/1 weights: po = 3/4, pe = 1/2 -> 0.5.
  assert metrics.quadratic_kappa([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx(0.5)


def test_kappa_reversed_order_is_minus_one():
  # O = anti-diagonal / 3, E = 1/9 everywhere, w_ij = (i - j)^2 / 4:
  # sum(wO) = 2/3, sum(wE) = 1/3 -> kappa = 1 - 2 = -1.
  assert metrics.quadratic_kappa([0, 1, 2], [2, 1, 0], 3) == pytest.approx(-1.0)


def test_kappa_against_closed_form_on_random_data():
  rng = np.random.default_rng(0)
  c = 4
  labels = rng.integers(0, c, 200)
  preds = np.clip(labels + rng.integers(-1, 2, 200), 0, c - 1)
  o = np.zeros((c, c))
  np.add.at(o, (labels, preds), 1.0)
  e = np.outer(o.sum(1), o.sum(0)) / o.sum()
  w = (np.arange(c)[:, None] - np.arange(c)[None, :]) ** 2 / (c - 1) ** 2
  want = 1 - (w * o).sum() / (w * e).sum()
  assert metrics.quadratic_kappa(labels, preds, c) == pytest.approx(want, abs=1e-12)


def test_kappa_perfect_and_off_by_one():
  assert metrics.quadratic_kappa([0, 1, 2, 3], [0, 1, 2, 3], 4) == pytest.approx(1.0)
  # Every prediction one grade off: weighted disagreement 4 * 1/9; expected (1/4) sum_j c_j
  # sum_i (i - j)^2 / 9 with column totals c = (0, 1, 2, 1): (6 + 12 + 14) / 36 = 8/9.
  assert metrics.quadratic_kappa([0, 1, 2, 3], [1, 2, 3, 2], 4) == pytest.approx(0.5)


def test_classification_metrics_fields():
  m = metrics.classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
  assert m['accuracy'] == pytest.approx(4 / 6)
  assert m['num_examples'] == 6
  assert m['balanced_accuracy'] == pytest.approx(13 / 18)
  assert m['confusion_matrix'] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_metrics_reject_bad_input():
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
    metrics.classification_metrics([0, 3], [0, 1], 3)
  with pytest.raises(ValueError, match='differ in length'):
    metrics.classification_metrics([0, 1], [0], 3)
  with pytest.raises(ValueError, match='no examples'):
    metrics.classification_metrics([], [], 3)


def test_selection_rule():
  assert metrics.improved(0.1, None, 0.01)               # the first epoch always sets the best
  assert not metrics.improved(0.51, 0.5, 0.01)           # +0.01 is not "more than 0.01"
  assert metrics.improved(0.5101, 0.5, 0.01)
  assert not metrics.improved(0.6, 0.7, 0.01)
  assert not metrics.improved(float('nan'), 0.5, 0.01)
  assert metrics.improved(0.2, float('nan'), 0.01)


def test_mean_std_sample():
  ms = metrics.mean_std([1.0, 2.0, 3.0])
  # sum of squared deviations 2, divided by n - 1 = 2
  assert ms['mean'] == pytest.approx(2.0) and ms['std'] == pytest.approx(1.0)
  assert metrics.mean_std([0.25]) == {'mean': 0.25, 'std': 0.0}


def test_summarize_over_runs():
  runs = [{'val': {'kappa': 0.5, 'balanced_accuracy': 0.6}, 'test': {'kappa': 0.4}},
          {'val': {'kappa': 0.7, 'balanced_accuracy': 0.8}, 'test': {'kappa': 0.2}}]
  s = metrics.summarize(runs)
  assert s['val']['kappa_mean'] == pytest.approx(0.6)
  assert s['val']['kappa_std'] == pytest.approx(math.sqrt(0.02))  # (0.1^2 + 0.1^2) / (2 - 1)
  assert s['test']['kappa_mean'] == pytest.approx(0.3)
  assert 'balanced_accuracy_mean' not in s['test']


def test_loss_means_independent_of_grouping_and_serialisable():
  rng = np.random.default_rng(1)
  steps = [{'loss/ce': np.float32(v)} for v in rng.normal(size=37)]
  a = metrics.LossMeans()
  a.add(steps)
  b = metrics.LossMeans()
  b.add(steps[:5])
  b = metrics.LossMeans.from_state(b.state())  # as through a checkpoint
  b.add(steps[5:20])
  b.add(steps[20:])
  assert a.means() == b.means()
  want = np.mean(np.asarray([float(s['loss/ce']) for s in steps], np.float64))
  assert a.means()['loss/ce'] == pytest.approx(want, rel=1e-12)
  assert metrics.LossMeans().means() == {}


# ----------------------------------------------------------------------------- paired seeds
# Four seeds, method a and baseline b: d = a - b = (0.08, -0.02, 0.09, 0.04).
PAIRED_A = [0.80, 0.75, 0.90, 0.70]
PAIRED_B = [0.72, 0.77, 0.81, 0.66]


def test_paired_t_by_hand_and_against_scipy():
  from scipy import stats
  d = np.subtract(PAIRED_A, PAIRED_B)
  out = metrics.paired_t(d)
  # By hand: mean 0.19 / 4 = 0.0475; squared deviations 0.0325^2 + 0.0675^2 + 0.0425^2 +
  # 0.0075^2 = 0.007475, / 3 -> std 0.0499166; se = std / 2 = 0.0249583; t = 1.90317;
  # t_{3, 0.975} = 3.18245 -> half-width 0.079428.
  assert out['n'] == 4 and out['mean'] == pytest.approx(0.0475, abs=1e-12)
  assert out['std'] == pytest.approx(np.sqrt(0.007475 / 3), rel=1e-9)
  assert out['t'] == pytest.approx(0.0475 / (np.sqrt(0.007475 / 3) / 2), rel=1e-9)
  assert out['lo'] == pytest.approx(0.0475 - 0.079428, abs=2e-6)
  assert out['hi'] == pytest.approx(0.0475 + 0.079428, abs=2e-6)
  ref = stats.ttest_rel(PAIRED_A, PAIRED_B)
  ci = ref.confidence_interval(0.95)
  assert out['t'] == pytest.approx(ref.statistic, rel=1e-12)
  assert out['p'] == pytest.approx(ref.pvalue, rel=1e-12)
  assert (out['lo'], out['hi']) == pytest.approx((ci.low, ci.high), rel=1e-12)
  # Another level, also scipy's.
  ci90 = ref.confidence_interval(0.90)
  out90 = metrics.paired_t(d, level=0.90)
  assert (out90['lo'], out90['hi']) == pytest.approx((ci90.low, ci90.high), rel=1e-12)


def test_paired_t_degenerate_cases():
  one = metrics.paired_t([0.1])
  assert one['mean'] == 0.1 and np.isnan(one['lo']) and np.isnan(one['p'])
  same = metrics.paired_t([0.05, 0.05, 0.05])
  assert same['lo'] == same['hi'] == pytest.approx(0.05) and same['p'] == 0.0
  with pytest.raises(ValueError):
    metrics.paired_t([])


def test_bootstrap_ci_by_hand_with_a_fixed_seed():
  d = [0.1, -0.2, 0.4]
  # np.random.default_rng(0).integers(0, 3, (4, 3)) draws the rows (2, 1, 1), (0, 0, 0),
  # (0, 0, 0), (2, 1, 2): resample means 0.0, 0.1, 0.1, 0.2. Linear quantiles of the 4 sorted
  # means: 2.5 % at position 3 * 0.025 = 0.075 -> 0.0 + 0.075 * 0.1 = 0.0075; 97.5 % at 2.925
  # -> 0.1 + 0.925 * 0.1 = 0.1925.
  np.testing.assert_array_equal(np.random.default_rng(0).integers(0, 3, (4, 3)),
                                [[2, 1, 1], [0, 0, 0], [0, 0, 0], [2, 1, 2]])
  out = metrics.bootstrap_ci(d, resamples=4, seed=0)
  assert out['n'] == 3 and out['mean'] == pytest.approx(0.1)
  assert out['lo'] == pytest.approx(0.0075, abs=1e-12)
  assert out['hi'] == pytest.approx(0.1925, abs=1e-12)
  # Reproducible with its seed; many resamples of 30 values approach the normal interval.
  assert metrics.bootstrap_ci(d, seed=3) == metrics.bootstrap_ci(d, seed=3)
  x = np.random.default_rng(1).normal(0.05, 0.1, 30)
  big = metrics.bootstrap_ci(x, resamples=20000, seed=0)
  half = 1.96 * x.std(ddof=0) / np.sqrt(30)
  assert big['lo'] == pytest.approx(x.mean() - half, abs=0.006)
  assert big['hi'] == pytest.approx(x.mean() + half, abs=0.006)


def test_wins_and_gap_closed():
  assert metrics.wins([0.1, -0.2, 0.0, 0.3]) == {'wins': 2, 'ties': 1, 'losses': 1}
  # Teacher 1.0, CE 0.7 and 0.8 (gap 0.3 and 0.2, mean 0.25); method +0.1 and +0.05 (mean 0.075)
  # -> 0.075 / 0.25 = 30 %.
  assert metrics.gap_closed([0.8, 0.85], [0.7, 0.8], [1.0, 1.0]) == pytest.approx(0.3)
  assert np.isnan(metrics.gap_closed([0.8], [1.0], [1.0]))


def test_seeds_for_half_width_against_a_t_table():
  """t_{0.975, n-1} from a printed table: 4.303 (2 df), 3.182 (3), 2.776 (4)."""
  # std 0.012: n=3 gives 4.303 * 0.012 / sqrt(3) = 0.0298 <= 0.03, n=2 (12.71 * 0.012 / 1.414) not
  assert metrics.seeds_for_half_width(0.012, 0.03) == 3
  # std 0.0125: n=3 gives 0.0311 > 0.03, n=4 gives 3.182 * 0.0125 / 2 = 0.0199
  assert metrics.seeds_for_half_width(0.0125, 0.03) == 4
  # std 0.02: n=4 gives 0.0318 > 0.03, n=5 gives 2.776 * 0.02 / sqrt(5) = 0.0248
  assert metrics.seeds_for_half_width(0.02, 0.03) == 5
  assert metrics.seeds_for_half_width(0.0, 0.03) == 2
  assert np.isnan(metrics.seeds_for_half_width(float('nan'), 0.03))
  assert np.isnan(metrics.seeds_for_half_width(1.0, 0.03, max_seeds=50))
