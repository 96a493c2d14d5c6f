"""camkd_jax.predict on a tiny smoke run over a folder of patches (class order given, 'auto'
input statistics): the CSV's probabilities, predictions and labels, and its bad-input errors."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from camkd_jax import input_pipeline
from camkd_jax import metrics
from camkd_jax import predict
from camkd_jax import train
from camkd_jax.datasets import base
from camkd_jax.datasets import export_folder
from configs import ce_student

pytestmark = pytest.mark.slow  # the module's smoke run: ~45 s on 2 cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['NC', 'G3', 'G4', 'G5']


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """(workdir, patch folder): a `smoke=1` CE run on 48 train / 24 test patches of 32 px."""
  tmp = tmp_path_factory.mktemp('predict')
  root = str(tmp / 'patches')
  export_folder.export(root, {'train': 48, 'test': 24}, size=32)
  config = ce_student.get_config(f'dataset=folder,root={root},smoke=1')
  config.data.class_names = ','.join(CLASSES)
  config.model.input_mean = config.model.input_std = 'auto'
  config.num_figure_images = 0
  workdir = str(tmp / 'run')
  train.run(config, workdir)
  return workdir, root


def read_csv(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  probs = np.array([[float(r[f'p_{c}']) for c in CLASSES] for r in rows])
  return rows, probs


def _check_csv(path, n, labelled=True):
  rows, probs = read_csv(path)
  assert len(rows) == n and list(rows[0])[:3] == ['path', 'label', 'prediction']
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  assert [r['prediction'] for r in rows] == [CLASSES[k] for k in probs.argmax(1)]
  if labelled:  # the label is the class folder the file is in
    assert [r['label'] for r in rows] == [r['path'].split(os.sep)[-2] for r in rows]
  return rows, probs


def test_run_records_auto_statistics_and_split(smoke_run):
  workdir, _ = smoke_run
  with open(os.path.join(workdir, 'student', 'metadata.json')) as f:
    meta = json.load(f)
  assert meta['class_names'] == CLASSES
  config = ce_student.get_config(f'dataset=folder,root={smoke_run[1]},smoke=1')
  config.data.class_names = ','.join(CLASSES)
  data = input_pipeline.get_data(config, process_index=0, process_count=1)
  mean, std = data.train_statistics()
  np.testing.assert_allclose(meta['model']['input_mean'], mean, atol=1e-6)
  np.testing.assert_allclose(meta['model']['input_std'], std, atol=1e-6)
  with open(os.path.join(workdir, 'data_split.csv')) as f:
    splits = [r['split'] for r in csv.DictReader(f)]
  assert (splits.count('train'), splits.count('validation'), splits.count('test')) == (
      data.num_examples['train'], data.num_examples['validation'], 24)
  assert 'Data warning' not in open(os.path.join(workdir, 'results.md')).read()


def test_predict_split_reproduces_the_run_metrics(smoke_run, tmp_path):
  workdir, _ = smoke_run
  out = str(tmp_path / 'test.csv')
  examples, probs, m = predict.predict(workdir, out, split='test')
  rows, csv_probs = _check_csv(out, 24)
  np.testing.assert_allclose(csv_probs, probs, atol=1e-6)
  with open(os.path.join(workdir, 'metrics.json')) as f:
    want = json.load(f)['student']['test']
  labels = np.array([CLASSES.index(r['label']) for r in rows])
  got = metrics.classification_metrics(labels, csv_probs.argmax(1), 4)
  assert got['confusion_matrix'] == want['confusion_matrix'] and m['kappa'] == want['kappa']


def test_predict_folder_and_table_with_the_teacher(smoke_run, tmp_path):
  workdir, root = smoke_run
  split_out = str(tmp_path / 'split.csv')
  predict.predict(workdir, split_out, which='teacher', split='test')
  by_path = {r['path']: p for r, p in zip(*read_csv(split_out))}
  # A folder: the test class folders plus one unlabelled patch directly inside.
  test_dir = os.path.join(root, 'test')
  one = sorted(by_path)[0]
  Image.open(one).save(os.path.join(test_dir, 'loose.png'))
  try:
    out = str(tmp_path / 'folder.csv')
    predict.predict(workdir, out, which='teacher', folder=test_dir)
    rows, probs = read_csv(out)
  finally:
    os.remove(os.path.join(test_dir, 'loose.png'))
  assert len(rows) == 25 and rows[0]['label'] == '' and rows[0]['path'].endswith('loose.png')
  _check_csv(out, 25, labelled=False)
  for r, p in zip(rows[1:], probs[1:]):
    np.testing.assert_allclose(p, by_path[r['path']], atol=2e-6)
  np.testing.assert_allclose(probs[0], by_path[one], atol=2e-6)
  # A table with the run's image column and a label column.
  table = tmp_path / 'patches.csv'
  table.write_text('image,label\n' + ''.join(f'{p},{p.split(os.sep)[-2]}\n' for p in by_path))
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['data']['image_column'] == 'image'
  out = str(tmp_path / 'table.csv')
  predict.predict(workdir, out, which='teacher', table=str(table))
  rows, probs = read_csv(out)
  assert [r['label'] for r in rows] == [p.split(os.sep)[-2] for p in by_path]  # column 'label'
  for r, p in zip(rows, probs):
    np.testing.assert_allclose(p, by_path[r['path']], atol=2e-6)


@pytest.mark.parametrize('kwargs, fragment', [
    (dict(split='test', folder='x'), 'give exactly one of --split, --folder, --table'),
    (dict(split='dev'), "--split='dev': choose one of ['train', 'validation', 'test']"),
    (dict(folder='/nonexistent'), "--folder='/nonexistent' is not a directory"),
])
def test_predict_bad_arguments(smoke_run, tmp_path, kwargs, fragment):
  with pytest.raises(base.DataError, match=None) as info:
    predict.predict(smoke_run[0], str(tmp_path / 'o.csv'), **kwargs)
  assert fragment in str(info.value)


def test_predict_refuses_unknown_class_folder_and_existing_out(smoke_run, tmp_path):
  (tmp_path / 'd' / 'G6').mkdir(parents=True)
  with pytest.raises(base.DataError, match=r"sub-folder\(s\) \['G6'\] are not classes of the "
                     r"model \['NC', 'G3', 'G4', 'G5'\]"):
    predict.predict(smoke_run[0], str(tmp_path / 'o.csv'), folder=str(tmp_path / 'd'))
  (tmp_path / 'o.csv').write_text('keep me')
  with pytest.raises(base.DataError, match='exists; choose another name or pass --overwrite'):
    predict.predict(smoke_run[0], str(tmp_path / 'o.csv'), split='test')
  assert (tmp_path / 'o.csv').read_text() == 'keep me'


def test_predict_cli_error_is_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-m', 'camkd_jax.predict', '--workdir',
                         str(tmp_path / 'none'), '--split', 'test', '--out',
                         str(tmp_path / 'o.csv')], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f'error: run directory {tmp_path / "none"} does not exist')
