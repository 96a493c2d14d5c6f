"""camkd_jax.gleason: the biopsy rules on hand-made pattern areas (no JAX, no TensorFlow)."""
import subprocess
import sys

import numpy as np
import pytest

from camkd_jax import gleason
import conftest  # pylint: disable=g-import-not-at-top


def _isup(primary, secondary):
  """The grade group from its published definition (Epstein et al. 2016), written apart from
  the module's table: score <= 6 -> 1, 3+4 -> 2, 4+3 -> 3, 8 -> 4, 9-10 -> 5."""
  s = primary + secondary
  if s <= 6:
    return 1
  if s == 7:
    return 2 if primary == 3 else 3
  return 4 if s == 8 else 5


@pytest.mark.parametrize('primary', [3, 4, 5])
@pytest.mark.parametrize('secondary', [3, 4, 5])
def test_grade_group_matches_the_published_definition(primary, secondary):
  assert gleason.grade_group(primary, secondary) == _isup(primary, secondary)


def test_grade_group_benign_and_bad_scores():
  assert gleason.grade_group(0, 0) == 0 and gleason.score_text(0, 0) == 'benign'
  for bad in ((0, 3), (2, 3), (3, 6)):
    with pytest.raises(ValueError, match='is not a Gleason score'):
      gleason.grade_group(*bad)


# (areas {0, 3, 4, 5}, primary, secondary, score text, grade group)
CASES = [
    ({0: 50, 3: 30, 4: 20}, 3, 4, '3+4=7', 2),          # 60 % G3, 40 % G4 of the tumour
    ({0: 50, 3: 20, 4: 30}, 4, 3, '4+3=7', 3),
    ({0: 10, 3: 90}, 3, 3, '3+3=6', 1),
    ({4: 60, 5: 40}, 4, 5, '4+5=9', 5),
    ({0: 100}, 0, 0, 'benign', 0),
    ({0: 40, 3: 58, 4: 2}, 3, 3, '3+3=6', 1),            # G4 = 3.3 % of the tumour < 5 %
    ({3: 60, 4: 30, 5: 10}, 3, 5, '3+5=8', 4),           # biopsy: the highest of the rest
    ({3: 30, 5: 70}, 5, 3, '5+3=8', 4),
    ({3: 50, 4: 50}, 4, 3, '4+3=7', 3),                  # a tie goes to the higher pattern
    ({0: 97, 4: 3}, 0, 0, 'benign', 0),                  # tumour 3 % of tissue < 5 %
    ({0: 95, 4: 5}, 4, 4, '4+4=8', 4),                   # tumour exactly 5 %: counts
    ({3: 95, 4: 5}, 3, 4, '3+4=7', 2),                   # a pattern exactly at 5 % counts
    ({4: 96, 3: 4}, 4, 4, '4+4=8', 4),                   # lower grade under 5 %: left out
]


@pytest.mark.parametrize('areas, primary, secondary, text, group', CASES)
def test_biopsy_rules_on_hand_made_areas(areas, primary, secondary, text, group):
  r = gleason.score(areas)
  assert (r['primary'], r['secondary'], r['score'], r['grade_group']) == (
      primary, secondary, text, group)
  tumour = sum(areas.get(p, 0) for p in (3, 4, 5))
  assert r['tumour_area'] == tumour and r['tissue_area'] == tumour + areas.get(0, 0)
  for p in (3, 4, 5):
    want = 100.0 * areas.get(p, 0) / tumour if tumour else 0.0
    assert r['pattern_percent'][str(p)] == pytest.approx(want)


def test_the_noise_thresholds_are_configurable():
  areas = {0: 40, 3: 57, 4: 3}  # G4 = 5 % of the tumour
  assert gleason.score(areas)['score'] == '3+4=7'
  assert gleason.score(areas, gleason.Rules(min_share=0.06))['score'] == '3+3=6'
  assert gleason.score({0: 97, 4: 3}, gleason.Rules(min_tumour=0.0))['score'] == '4+4=8'
  # a threshold no pattern reaches leaves the most extensive one
  assert gleason.score({3: 40, 4: 30, 5: 30}, gleason.Rules(min_share=0.5))['score'] == '3+3=6'
  for bad in (dict(min_share=1.0), dict(min_tumour=-0.1), dict(weighting='mean')):
    with pytest.raises(ValueError):
      gleason.Rules(**bad)


def test_pattern_areas_by_count_and_by_probability():
  probs = np.array([[0.7, 0.2, 0.1, 0.0],
                    [0.1, 0.5, 0.4, 0.0],
                    [0.0, 0.3, 0.6, 0.1]])
  patterns = [0, 3, 4, 5]
  assert gleason.pattern_areas(probs, patterns) == {0: 1.0, 3: 1.0, 4: 1.0, 5: 0.0}
  got = gleason.pattern_areas(probs, patterns, 'probability', tile_area=2.0)
  assert got == pytest.approx({0: 1.6, 3: 2.0, 4: 2.2, 5: 0.2})
  # a class mapped to None is left out of tissue and tumour
  assert gleason.pattern_areas(probs, [0, 3, None, 5]) == {0: 1.0, 3: 1.0, 4: 0.0, 5: 0.0}


def test_slide_score_in_mm2_and_in_tiles():
  probs = np.eye(4)[[0, 0, 1, 1, 1, 2, 2]]  # 2 NC, 3 G3, 2 G4
  r = gleason.slide_score(probs, [0, 3, 4, 5], tile_area_mm2=0.25)
  assert (r['score'], r['grade_group']) == ('3+4=7', 2)
  assert (r['tissue_tiles'], r['tumour_tiles']) == (7, 5)
  assert (r['tissue_mm2'], r['tumour_mm2']) == (1.75, 1.25)
  assert r['tumour_percent'] == pytest.approx(500 / 7)
  assert r['rules'] == {'min_share': 0.05, 'min_tumour': 0.05, 'weighting': 'count'}
  assert gleason.slide_score(probs, [0, 3, 4, 5])['tissue_mm2'] is None


def test_class_patterns_default_and_mapping():
  assert gleason.class_patterns(['NC', 'G3', 'G4', 'G5']) == [0, 3, 4, 5]
  assert gleason.class_patterns(['G3', 'G4']) == [3, 4]
  assert gleason.class_patterns(['benign', 'tumour']) is None
  assert gleason.class_patterns(['NC']) is None
  assert gleason.class_patterns(['b', 'low', 'high', 'junk'], 'b=benign,low=3,high=4,junk=none') \
      == [0, 3, 4, None]
  with pytest.raises(ValueError, match=r"unknown \['x'\]; missing \['b'\]"):
    gleason.class_patterns(['a', 'b'], 'a=3,x=4')
  with pytest.raises(ValueError, match="a=7.*benign, 3, 4, 5 or none"):
    gleason.parse_patterns('a=7')
  with pytest.raises(ValueError, match="'a' is not CLASS=PATTERN"):
    gleason.parse_patterns('a')


def test_importing_gleason_loads_neither_jax_nor_tensorflow():
  code = ('import sys, camkd_jax.gleason; '
          'print(sorted(m for m in ("jax", "tensorflow") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=conftest.REPO, capture_output=True,
                       text=True, check=True, env={'PYTHONPATH': conftest.REPO, 'PATH': ''})
  assert out.stdout.strip() == '[]'
