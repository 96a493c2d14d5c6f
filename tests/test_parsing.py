"""camkd_jax.parsing.split_list: the one comma-list splitter of the flags and config keys."""
import pytest

from camkd_jax import parsing


@pytest.mark.parametrize('text,want', [
    ('NC=benign,G3=3,G4=4', ['NC=benign', 'G3=3', 'G4=4']),
    (' a , b ,, c ,', ['a', 'b', 'c']),     # items stripped, empty ones dropped
    ('', []), (' , ,', []),
    ('single', ['single']),
    ('a b,c', ['a b', 'c']),                # only commas separate
    (22, ['22']),                           # str() of a non-string (a config value)
])
def test_split_list(text, want):
  assert parsing.split_list(text) == want
