"""camkd_jax.slide_level: the slide-level metric of a run's evaluation (patches grouped by slide),
on a real table dataset with a slide column and through evaluation.evaluate."""
import numpy as np
import pytest

from camkd_jax import gleason
from camkd_jax import reporting
from camkd_jax import slide_labels
from camkd_jax import slide_level
from helpers import FixedPredictionData, data_config, png_bytes, random_image, write_xlsx

LABEL_HEADER = ('slide_id', 'patient_id', 'Gleason_primary', 'Gleason_secondary')


def _reference_order(n, count, bl, batches):
  """What Data.eval_batches + evaluation.predict do: each process's contiguous shard in padded
  batches of bl, global batch k = the processes' k-th batches side by side, padding dropped."""
  per_process = []
  for p in range(count):
    shard = list(range(n * p // count, n * (p + 1) // count))
    shard += [-1] * (batches * bl - len(shard))
    per_process.append(shard)
  flat = [i for k in range(batches) for s in per_process for i in s[k * bl:(k + 1) * bl]]
  return [i for i in flat if i >= 0]


@pytest.mark.parametrize('n, count, bl', [(10, 1, 4), (10, 2, 2), (11, 3, 2), (7, 2, 8),
                                          (3, 3, 1), (0, 2, 4)])
def test_gathered_order_is_predicts_order(n, count, bl):
  batches = int(np.ceil(np.ceil(n / count) / bl))
  got = slide_level.gathered_order(n, count, bl, batches)
  assert got.tolist() == _reference_order(n, count, bl, batches)
  assert sorted(got.tolist()) == list(range(n))


def _level(ids, labels, rules=gleason.Rules()):
  return slide_level.SlideLevel(labels, [0, 3, 4, 5], rules,
                                {s: np.asarray(v, object) for s, v in ids.items()}, 'L')


def test_grades_per_slide_from_patch_predictions():
  ids = ['a'] * 10 + ['b'] * 5 + ['c'] * 4
  preds = ([1] * 6 + [2] * 3 + [0]) + ([0] * 5) + ([3, 3, 2, 2])
  level = _level({'test': ids}, {'a': (3, 4), 'b': (0, 0), 'c': (4, 4), 'z': (3, 3)})
  assert level.grades('test', np.array(preds)) == {'a': (3, 4), 'b': (0, 0), 'c': (5, 4)}
  m = level.evaluate('test', np.array(preds))
  # grade groups: truth a 2, b 0, c 4; ours 2, 0, 5
  assert (m['num_slides'], m['accuracy'], m['unlabelled_slides']) == (3, pytest.approx(2 / 3), 0)
  want = slide_labels.slide_metrics({'a': (3, 4), 'b': (0, 0), 'c': (4, 4)},
                                    {'a': (3, 4), 'b': (0, 0), 'c': (5, 4)})
  assert m['kappa'] == want['kappa'] and m['confusion_matrix'] == want['confusion_matrix']
  with pytest.raises(ValueError, match='3 predictions for the 19 patches of test'):
    level.grades('test', np.zeros(3, int))


def test_train_evaluate_adds_slide_level_and_keeps_the_patch_metrics():
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import evaluation  # pylint: disable=g-import-not-at-top
  from camkd_jax import sharding  # pylint: disable=g-import-not-at-top
  val = ([1, 1, 2, 0, 0, 0], [1, 1, 2, 0, 0, 1])        # slides v1 (3+4), v2 (benign + 1 G3)
  test = ([2, 2, 2, 1, 1], [2, 2, 1, 1, 1])             # slide t1 (4+3 truth), ours 3+4
  level = _level({'validation': ['v1'] * 3 + ['v2'] * 3, 'test': ['t1'] * 5},
                 {'v1': (3, 4), 'v2': (0, 0), 't1': (4, 3)})
  # padded rows predict 3 (G5), so counting them would change the slide grades
  data = FixedPredictionData({'validation': val, 'test': test}, 4, 0, 3, level)
  eval_step = lambda params, images: 5.0 * jax.nn.one_hot(images[:, 0, 0, 0], 4)
  out = evaluation.evaluate(eval_step, None, data, sharding.make_mesh())
  # v2: 2 NC + 1 G3 -> tumour 33 % >= 5 %: 3+3 (grade group 1) against benign
  assert out['val']['slide_level']['confusion_matrix'][0][1] == 1
  assert out['val']['slide_level']['accuracy'] == 0.5
  assert out['test']['slide_level']['accuracy'] == 0.0
  assert out['test']['slide_level']['score_accuracy'] == 1.0  # 7 = 7
  assert out['val']['accuracy'] == pytest.approx(5 / 6)      # the patch metrics as before
  del data.slide_level
  assert 'slide_level' not in evaluation.evaluate(eval_step, None, data, sharding.make_mesh())['val']


def _table(tmp_path, rows):
  """A table dataset: image, label, split, slide columns; tiny random PNGs."""
  lines = ['image,label,split,slide']
  for i, (label, split, slide) in enumerate(rows):
    (tmp_path / f'{i}.png').write_bytes(png_bytes(random_image(i, 8)))
    lines.append(f'{i}.png,{label},{split},{slide}')
  (tmp_path / 't.csv').write_text('\n'.join(lines) + '\n')
  return str(tmp_path / 't.csv')


def test_setup_on_a_table_with_a_slide_column(tmp_path):
  from camkd_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  classes = ['NC', 'G3', 'G4', 'G5']
  rows = [(c, s, f'{s}_{k % 2}') for s in ('train', 'validation', 'test') for k, c in
          enumerate(classes * 2)]
  cfg = data_config(name='table', table=_table(tmp_path, rows), label_column='label',
                    class_names=','.join(classes))
  write_xlsx(str(tmp_path / 'wsi.xlsx'), [('validation_0', 'p', 3, 4), ('test_1', 'p', 4, 5)],
             header=LABEL_HEADER)
  cfg.slide_level.labels = str(tmp_path / 'wsi.xlsx')
  cfg.eval_batch_size = 4
  data = input_pipeline.get_data(cfg, process_index=0, process_count=1)
  level = slide_level.setup(cfg, data)
  for split in ('validation', 'test'):
    want = [r[2] for r in rows if r[1] == split]
    assert level.ids[split].tolist() == want  # the table's order: one process, no shuffling
  # patch predictions = the true labels: slide validation_0 holds NC, G4, NC, G4 -> 4+4;
  # validation_1 G3, G5, G3, G5 -> a tie, the higher pattern first: 5+3
  labels = {s: np.concatenate([b['label'][b['mask']] for b in data.eval_batches(s)])
            for s in ('validation', 'test')}
  assert level.grades('validation', labels['validation']) == {'validation_0': (4, 4),
                                                              'validation_1': (5, 3)}
  m = level.evaluate('validation', labels['validation'], labels['validation'])
  assert (m['num_slides'], m['unlabelled_slides'], m['accuracy']) == (1, 1, 0.0)
  # patches gathered in another order than the slide ids: no metric rather than a wrong one
  assert level.evaluate('validation', labels['validation'], labels['validation'][::-1]) is None
  # no labels: nothing; a dataset without slides: one clear error
  cfg.slide_level.labels = ''
  assert slide_level.setup(cfg, data) is None
  cfg.slide_level.labels = str(tmp_path / 'wsi.xlsx')
  data.source._splits['test'].slides = None  # pylint: disable=protected-access
  data._eval_cache.clear()  # pylint: disable=protected-access
  with pytest.raises(Exception, match='do not name their slide.*config.data.slide_column'):
    slide_level.setup(cfg, data)


def test_table_slide_column_errors(tmp_path):
  from camkd_jax import datasets  # pylint: disable=g-import-not-at-top
  rows = [('NC', 'train', 'a'), ('G3', 'train', ''), ('NC', 'test', 'b'), ('G3', 'test', 'b')]
  cfg = data_config(name='table', table=_table(tmp_path, rows), label_column='label')
  with pytest.raises(Exception, match=r"empty slide in column 'slide' in row\(s\) 3; fill them"):
    datasets.get_source(cfg)
  cfg.data.slide_column = 'patient'
  with pytest.raises(Exception, match=r"no column 'patient' \(config.data.slide_column\)"):
    datasets.get_source(cfg)


def test_sicapv2_labels_are_found_and_patch_names_give_slides(tmp_path):
  cfg = data_config(name='sicapv2', manual_dir=str(tmp_path))
  assert slide_level.labels_path(cfg) == ''
  (tmp_path / 'SICAPv2').mkdir()
  write_xlsx(str(tmp_path / 'SICAPv2' / 'wsi_labels.xlsx'), [('16B0001851', 'p', 3, 4)],
             header=LABEL_HEADER)
  assert slide_level.labels_path(cfg) == str(tmp_path / 'SICAPv2' / 'wsi_labels.xlsx')
  from camkd_jax.datasets import base  # pylint: disable=g-import-not-at-top
  ex = base.Examples([b''] * 2, np.zeros(2, np.int32),
                     ['16B0001851_Block_Region_1_0_0_xini_6803_yini_59786.jpg',
                      '16B0003388_Block_Region_3_1_2_xini_1_yini_2.jpg'], from_files=False)
  assert slide_level.split_slide_ids(ex, 'sicapv2').tolist() == ['16B0001851', '16B0003388']
  assert slide_level.split_slide_ids(ex, 'synthetic_histology') is None


def test_results_md_gets_a_slide_level_section():
  sl = {'num_slides': 31, 'kappa': 0.8123, 'accuracy': 0.6}
  out = {'seeds': [22],
         'teacher': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.5, 'slide_level': sl},
                     'test': {'balanced_accuracy': 0.5, 'kappa': 0.5, 'slide_level': None}},
         'student': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.5},
                     'test': {'balanced_accuracy': 0.5, 'kappa': 0.5}}}
  text = reporting.slide_level_markdown(out)
  assert '| teacher (seed 22) | 31 | 0.8123 | 0.6000 | - | - | - |' in text
  assert 'student' not in text
  del out['teacher']['val']['slide_level']
  assert reporting.slide_level_markdown(out) == ''


def test_an_older_workdir_without_the_slide_level_keys_resumes():
  import copy  # pylint: disable=g-import-not-at-top
  from camkd_jax import runs  # pylint: disable=g-import-not-at-top
  from camkd_jax import workdir  # pylint: disable=g-import-not-at-top
  new = runs.config_dict(data_config())
  old = copy.deepcopy(new)
  del old['slide_level'], old['data']['slide_column']
  assert workdir.config_differences(old, new) == []
  new['slide_level']['min_share'] = 0.1
  assert workdir.config_differences(old, new) == ['slide_level.min_share: 0.05 -> 0.1']


def test_selection_on_the_slide_kappa_only_when_asked():
  val = {'kappa': 0.7, 'slide_level': {'kappa': 0.9}}
  assert slide_level.selection_value(val, 'kappa') == 0.7
  assert slide_level.selection_value(val, 'slide_kappa') == 0.9
  assert np.isnan(slide_level.selection_value({'kappa': 0.7, 'slide_level': None}, 'slide_kappa'))
  cfg = data_config()
  slide_level.check_selection(cfg, None)  # selecting on kappa: no labels needed
  cfg.selection.metric = 'slide_kappa'
  from camkd_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="selection.metric='slide_kappa'.*no slide-level"):
    slide_level.check_selection(cfg, None)
  slide_level.check_selection(cfg, _level({}, {}))
  from camkd_jax import config_checks  # pylint: disable=g-import-not-at-top
  assert 'slide_kappa' in config_checks.SELECTION_METRICS
