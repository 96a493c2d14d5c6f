"""What the benchmark measures: the programs, one configuration (`Case`) and the fixed suites.

No JAX here: `cases_from_args` turns the parsed flags into the list of configurations.
"""
import dataclasses
from typing import List, Tuple

NUM_CLASSES = 4  # NC, G3, G4, G5
PROGRAMS = ('distill', 'teacher', 'eval')


@dataclasses.dataclass(frozen=True)
class Case:
  """One configuration. factor 0 = --factor; view and factor are ignored by the teacher program
  (its input is the full-resolution image)."""
  program: str
  dtype: str
  terms: Tuple[str, ...] = ()
  view: str = 'upsampled'
  factor: int = 0

  @property
  def name(self):
    return f'distill[{"+".join(self.terms)}]' if self.program == 'distill' else self.program

  @property
  def label(self):
    """Name and dtype, plus the view and factor where they are not the defaults."""
    extra = '' if self.program == 'teacher' else (
        (f' {self.view}' if self.view != 'upsampled' else '') +
        (f' f={self.factor}' if self.factor else ''))
    return f'{self.name} {self.dtype}{extra}'

  def student_factor(self, args) -> int:
    return 1 if self.program == 'teacher' else (self.factor or args.factor)


_PAPER = ('ce', 'fm', 'at')
# Prioritised: the targets first, then the cost of AT+ and the teacher; with
# --time_budget_s the tail is what gets dropped.
# The native students come right after their upsampled bf16 counterparts at f = 4,
# so the first GPU run compares them within its budget; the f = 2, 8 native steps follow the
# float32 targets (an upsampled step costs the same at every f: its student runs at S).
SUITES = {
    'gpu': (
        Case('distill', 'bfloat16', _PAPER), Case('distill', 'bfloat16', _PAPER, 'native'),
        Case('eval', 'bfloat16'), Case('eval', 'bfloat16', (), 'native'),
        Case('distill', 'float32', _PAPER), Case('eval', 'float32'),
        Case('distill', 'bfloat16', _PAPER, 'native', 2),
        Case('distill', 'bfloat16', _PAPER, 'native', 8),
        Case('distill', 'bfloat16', ('ce', 'fm')), Case('teacher', 'bfloat16', ('ce',)),
        Case('distill', 'float32', ('ce', 'fm')), Case('teacher', 'float32', ('ce',)),
    ),
}


def cases_from_args(args) -> List[Case]:
  """The configurations, by dtype, program, terms, factor, view (the teacher once per dtype).
  A single factor is left as 0 (= --factor) so that labels stay short."""
  if args.suite:
    return list(SUITES[args.suite])
  factors = [0] if args.factors == [args.factor] else args.factors
  out = []
  for dtype in args.dtypes:
    for program in args.programs:
      if program == 'teacher':
        out.append(Case(program, dtype, ('ce',)))
        continue
      for terms in (args.terms if program == 'distill' else [()]):
        out.extend(Case(program, dtype, terms, view, f) for f in factors for view in args.views)
  return out

