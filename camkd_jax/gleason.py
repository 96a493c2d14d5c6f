"""Slide-level Gleason scoring from tile predictions: pure NumPy, no JAX, no TensorFlow.

The rules are those published for needle biopsies (ISUP 2014 consensus, Epstein et al., Am J
Surg Pathol 40(2):244-252, 2016; ISUP 2019 update, van Leenders et al., Am J Surg Pathol
44(8):e87-e99, 2020; Epstein et al. 2016 grade groups, Eur Urol 69(3):428-435):

  primary   = the most extensive pattern (ties: the higher one);
  secondary = the highest pattern of the rest, whatever its amount (in a biopsy any amount of a
              higher grade counts), or the primary again when there is no other pattern;
  score     = primary + secondary;
  grade group (ISUP): 3+3 -> 1, 3+4 -> 2, 4+3 -> 3, 4+4 / 3+5 / 5+3 -> 4, 4+5 / 5+4 / 5+5 -> 5.

Tile classifiers put a few tiles of every class on every slide, so "any amount" is taken above a
noise threshold: a pattern counts when it covers at least `min_share` of the tumour area
(default 5 %, the share under which ISUP also leaves a lower-grade pattern out), and a slide has
tumour when its tumour covers at least `min_tumour` of the tissue (default 5 %); below that it is
benign (score 0+0, grade group 0). Both are documented, configurable choices of this package,
not part of the published rules. (The SICAPv2 authors' biopsy score feeds the pattern shares to a
small trained network; this rule-based score is ours.)

Areas: 'count' (the default) gives each tile's area to its predicted class, the same tiles that
the class map and regions.geojson show; 'probability' splits each tile's area by its class
probabilities.
"""
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from camkd_jax import parsing

BENIGN = 0
PATTERNS = (3, 4, 5)
DEFAULT_PATTERNS = {'NC': BENIGN, 'G3': 3, 'G4': 4, 'G5': 5}
WEIGHTINGS = ('count', 'probability')
GRADE_GROUPS = {(3, 3): 1, (3, 4): 2, (4, 3): 3, (4, 4): 4, (3, 5): 4, (5, 3): 4, (4, 5): 5,
                (5, 4): 5, (5, 5): 5}
GRADE_GROUP_NAMES = ('benign', '1', '2', '3', '4', '5')


@dataclasses.dataclass(frozen=True)
class Rules:
  """The noise thresholds (fractions in [0, 1)) and the area weighting."""
  min_share: float = 0.05     # of the tumour area, for a pattern to count
  min_tumour: float = 0.05    # of the tissue area, for the slide to have tumour
  weighting: str = 'count'    # 'count' | 'probability'

  def __post_init__(self):
    for key in ('min_share', 'min_tumour'):
      v = getattr(self, key)
      if not 0.0 <= v < 1.0:
        raise ValueError(f'{key}={v!r} must be a fraction in [0, 1) (e.g. 0.05 for 5 %)')
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f'weighting={self.weighting!r} is not one of {list(WEIGHTINGS)}')


def grade_group(primary: int, secondary: int) -> int:
  """ISUP grade group 1-5 of primary + secondary, 0 for benign (0 + 0)."""
  if (primary, secondary) == (BENIGN, BENIGN):
    return 0
  try:
    return GRADE_GROUPS[(int(primary), int(secondary))]
  except KeyError:
    raise ValueError(f'{primary}+{secondary} is not a Gleason score: patterns are 3, 4, 5 '
                     '(or 0+0 for benign)') from None


def score_text(primary: int, secondary: int) -> str:
  """'3+4=7', or 'benign'."""
  if primary == BENIGN:
    return 'benign'
  return f'{primary}+{secondary}={primary + secondary}'


def parse_patterns(text: str) -> Dict[str, Optional[int]]:
  """'NC=benign,G3=3,G4=4,G5=5,STROMA=none' -> {class: 0 | 3 | 4 | 5 | None}.

  'benign' (or 0) is benign tissue, 3/4/5 the Gleason patterns, 'none' a class left out of the
  score (its tiles count neither as tissue nor as tumour, e.g. artefacts)."""
  out = {}
  for item in parsing.split_list(text):
    name, sep, value = item.partition('=')
    name, value = name.strip(), value.strip().lower()
    if not sep or not name:
      raise ValueError(f'class pattern mapping {text!r}: {item!r} is not CLASS=PATTERN (e.g. '
                       'NC=benign,G3=3,G4=4,G5=5)')
    if value in ('benign', '0'):
      out[name] = BENIGN
    elif value in ('3', '4', '5'):
      out[name] = int(value)
    elif value in ('none', 'ignore', ''):
      out[name] = None
    else:
      raise ValueError(f'class pattern mapping {text!r}: {name}={value!r}; a class maps to '
                       'benign, 3, 4, 5 or none')
  return out


def class_patterns(class_names: Sequence[str], mapping: str = '') -> Optional[List]:
  """The pattern of each class (0 benign, 3/4/5, None left out), or None when the classes are
  not Gleason patterns (no mapping given and not the default NC/G3/G4/G5 names)."""
  if not mapping:
    if set(class_names) <= set(DEFAULT_PATTERNS) and any(
        DEFAULT_PATTERNS[c] in PATTERNS for c in class_names):
      return [DEFAULT_PATTERNS[c] for c in class_names]
    return None
  table = parse_patterns(mapping)
  unknown = sorted(set(table) - set(class_names))
  missing = [c for c in class_names if c not in table]
  if unknown or missing:
    raise ValueError(f'class pattern mapping {mapping!r} does not match the classes '
                     f'{list(class_names)}: ' + '; '.join(
                         ([f'unknown {unknown}'] if unknown else [])
                         + ([f'missing {missing}'] if missing else []))
                     + '. Map every class, e.g. NC=benign,G3=3,G4=4,G5=5')
  return [table[c] for c in class_names]


def pattern_areas(probs: np.ndarray, patterns: Sequence, weighting: str = 'count',
                  tile_area: float = 1.0) -> Dict[int, float]:
  """{0, 3, 4, 5: area} from (N, C) tile probabilities; classes mapped to None are left out."""
  probs = np.asarray(probs, np.float64).reshape(len(probs), len(patterns))
  if weighting == 'count':
    per_class = np.bincount(probs.argmax(1), minlength=len(patterns)).astype(np.float64)
  elif weighting == 'probability':
    per_class = probs.sum(0)
  else:
    raise ValueError(f'weighting={weighting!r} is not one of {list(WEIGHTINGS)}')
  out = {BENIGN: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
  for area, p in zip(per_class, patterns):
    if p is not None:
      out[p] += float(area) * tile_area
  return out


def score(areas: Mapping[int, float], rules: Rules = Rules()) -> Dict:
  """The slide-level result of pattern areas {0 (benign), 3, 4, 5: area} (any unit).

  Returns tissue and tumour area, tumour percent of tissue, each pattern's percent of the tumour
  (as measured, before any threshold), primary, secondary, score text, grade group (0 benign)."""
  a = {p: float(areas.get(p, 0.0)) for p in (BENIGN,) + PATTERNS}
  if any(v < 0 for v in a.values()):
    raise ValueError(f'pattern areas must be >= 0, got {a}')
  tumour = sum(a[p] for p in PATTERNS)
  tissue = tumour + a[BENIGN]
  percent = {p: 100.0 * a[p] / tumour if tumour > 0 else 0.0 for p in PATTERNS}
  eps = 1e-12  # a share exactly at a threshold counts (3 / 60 vs 0.05 * 60 in floats)
  has_tumour = tumour > 0 and tumour / tissue >= rules.min_tumour - eps
  if has_tumour:
    present = [p for p in PATTERNS if a[p] > 0 and a[p] / tumour >= rules.min_share - eps]
    primary = max(PATTERNS, key=lambda p: (a[p], p))  # the most extensive always counts
    present = sorted(set(present) | {primary})
    rest = [p for p in present if p != primary]
    secondary = max(rest) if rest else primary
  else:
    primary = secondary = BENIGN
  return {
      'tissue_area': tissue, 'tumour_area': tumour,
      'tumour_percent': 100.0 * tumour / tissue if tissue > 0 else 0.0,
      'pattern_percent': {str(p): percent[p] for p in PATTERNS},
      'primary': primary, 'secondary': secondary,
      'gleason_score': primary + secondary, 'score': score_text(primary, secondary),
      'grade_group': grade_group(primary, secondary),
  }


def slide_score(probs: np.ndarray, patterns: Sequence, rules: Rules = Rules(),
                tile_area_mm2: Optional[float] = None) -> Dict:
  """score() of (N, C) tile probabilities, with the areas in mm^2 when the tile area is known
  (else in tiles), and the rules used."""
  areas = pattern_areas(probs, patterns, rules.weighting)
  out = score(areas, rules)
  unit = tile_area_mm2 if tile_area_mm2 else None
  out['tissue_mm2'] = out['tissue_area'] * unit if unit else None
  out['tumour_mm2'] = out['tumour_area'] * unit if unit else None
  out['tissue_tiles'] = out.pop('tissue_area')
  out['tumour_tiles'] = out.pop('tumour_area')
  out['rules'] = dataclasses.asdict(rules)
  return out
