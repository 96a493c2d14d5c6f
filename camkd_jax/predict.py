r"""Per-patch predictions of a finished run: class probabilities, the prediction, the label.

  python -m camkd_jax.predict --workdir RUN --split test --out test.csv
  python -m camkd_jax.predict --workdir RUN --folder DIR --out predictions.csv
  python -m camkd_jax.predict --workdir RUN --table FILE.csv --out predictions.csv --model teacher

The model is the run's exported student (default; it sees each patch at its own magnification
and view, upsampled or native, exactly as in the run's evaluation) or teacher, loaded by
camkd_jax.inference.load_run_model and run by inference.Predictor on full-resolution patches.
Patches are given at the teacher's magnification, like the training data, and resized to the
run's image_size as in training.

  --split    a split of the run's own data (its config.json; the same files as data_split.csv)
  --folder   DIR/<class>/* (labels known; class folders must be the run's classes) and/or image
             files directly in DIR (no label)
  --table    a CSV/XLSX with the image column of the run's config (or --image_column); labels
             from its label column (--label_column, the run's, or 'label') or one-hot class
             columns when the table has them

The CSV has one row per patch: path, label ('' when unknown), prediction, then p_<class> for
every class (softmax probabilities, summing to 1). An existing --out is not replaced unless
--overwrite. Bad input ends in one line naming the file, row or flag (exit code 2).
"""
import csv
import os

from absl import app
from absl import flags
import numpy as np

from camkd_jax import cli
from camkd_jax import runs
from camkd_jax.datasets import base

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when run as a command: importing the module defines
  none, so it coexists with other absl programs such as camkd_jax.main)."""
  flags.DEFINE_string('workdir', None, 'A finished run (for a multi-seed run: RUN/seed_<n>).')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which exported model.')
  flags.DEFINE_string('split', None, 'train | validation | test of the run\'s own data.')
  flags.DEFINE_string('folder', None, 'Folder of patches: DIR/<class>/* and/or DIR/*.')
  flags.DEFINE_string('table', None, 'CSV/XLSX table of patches.')
  flags.DEFINE_string('image_column', None, 'Image column of --table (default: the run\'s).')
  flags.DEFINE_string('label_column', None, 'Label column of --table (default: the run\'s, else '
                      '"label" when the table has one).')
  flags.DEFINE_string('out', None, 'Output CSV.')
  flags.DEFINE_integer('batch_size', 0, 'Patches per step (default: the run\'s eval_batch_size).')
  flags.DEFINE_bool('skip_corrupt', False, 'Skip unreadable images (listed in the log).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')


def run_config(workdir):
  """The run's config (config.json) as a ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(runs.read_config(workdir))


# ----------------------------------------------------------------------------- inputs
def split_examples(config, split, class_names):
  """Examples of a split of the run's own data (listed and split as in the run)."""
  from camkd_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if split not in base.SPLITS:
    raise base.DataError(f'--split={split!r}: choose one of {list(base.SPLITS)}')
  data = input_pipeline.get_data(config, process_index=0, process_count=1)
  if list(data.class_names) != list(class_names):
    raise base.DataError(f'the run\'s data now has classes {data.class_names}, the model '
                         f'{list(class_names)}; predict on a --folder or --table instead')
  return data.source.read(split)


def folder_examples(root, class_names):
  """DIR/<class>/* (labelled) and DIR/* (label -1)."""
  from camkd_jax.datasets import folder  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(root):
    raise base.DataNotFoundError(f'--folder={root!r} is not a directory')
  subdirs = folder.list_folders(root)
  unknown = [d for d in subdirs if d not in class_names]
  if unknown:
    raise base.DataError(f'--folder {root}: sub-folder(s) {unknown} are not classes of the model '
                         f'{list(class_names)}; put unlabelled images directly in {root}')
  paths = folder.list_images(root, recursive=False)
  labels = [-1] * len(paths)
  for d in subdirs:
    files = folder.list_images(os.path.join(root, d))
    paths += files
    labels += [list(class_names).index(d)] * len(files)
  if not paths:
    raise base.DataNotFoundError(f'--folder {root}: no image files '
                                 f'({", ".join(base.IMAGE_EXTENSIONS)})')
  return paths, labels


def table_examples(path, class_names, image_column, label_column):
  """Rows of a table: image paths and labels (-1 when the table has no labels)."""
  from camkd_jax.datasets import table  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f'--table={path!r} is not a file')
  t = table.Table(path)
  t.require(image_column, 'image_column (or --image_column)')
  paths = table.image_paths(t, image_column)
  label_column = label_column or ('label' if 'label' in t.col else '')
  if label_column:
    t.require(label_column, 'label_column (or --label_column)')
    values = t.values(label_column)
    outside = [f'{n} ({v!r})' for n, v in zip(t.numbers, values) if v and v not in class_names]
    if outside:
      raise base.DataError(f'table {path}: label(s) in column {label_column!r} that are not '
                           f'classes of the model {list(class_names)}: row(s) '
                           f'{base.first_of(outside)}')
    labels = [list(class_names).index(v) if v else -1 for v in values]
  elif all(c in t.col for c in class_names):
    labels = [base.one_hot_label([r[t.col[c]] for c in class_names], class_names, t.where(i))
              for i, r in enumerate(t.rows)]
  else:
    labels = [-1] * len(paths)
  return paths, labels


def checked_examples(paths, labels, where, skip_corrupt):
  """Examples of the readable files (all unreadable ones in one error, or skipped and logged)."""
  keep, _, _ = base.readable_files(paths, where, skip_corrupt, '--skip_corrupt', cache_key=where)
  return base.Examples([paths[i] for i in keep], np.asarray(labels, np.int32)[keep],
                       [paths[i] for i in keep], from_files=True)


# ----------------------------------------------------------------------------- predicting
def predict_probabilities(run_model, examples, batch_size):
  """(N, C) float32 softmax probabilities of every example, in order: the patches decoded and
  resized as in training (input_pipeline.read_batches) and predicted as in the run's evaluation
  (inference.Predictor on full-resolution patches)."""
  from camkd_jax import inference  # pylint: disable=g-import-not-at-top
  from camkd_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  predictor = inference.Predictor(run_model, batch_size, full_resolution=True)
  batches = input_pipeline.read_batches(examples, np.arange(len(examples)),
                                        predictor.batch_size, run_model.image_size)
  out = list(predictor.predict_batches(images for images, _ in batches))
  if not out:
    return np.zeros((0, len(run_model.class_names)), np.float32)
  return np.concatenate(out)


def write_predictions(path, examples, probs, class_names):
  """The CSV (runs.atomic_write: never a half-written file)."""
  def write(f):
    w = csv.writer(f)
    w.writerow(['path', 'label', 'prediction'] + [f'p_{c}' for c in class_names])
    for name, label, p in zip(examples.names, examples.labels, probs):
      w.writerow([name, class_names[label] if label >= 0 else '',
                  class_names[int(np.argmax(p))]] + [f'{v:.6g}' for v in p])
  runs.atomic_write(path, write, newline='')


def summary(examples, probs, num_classes):
  """Metrics on the labelled patches ({} when none is labelled)."""
  from camkd_jax import metrics  # pylint: disable=g-import-not-at-top
  known = examples.labels >= 0
  if not known.any():
    return {}
  return metrics.classification_metrics(examples.labels[known], probs[known].argmax(-1),
                                        num_classes)


def predict(workdir, out, which='student', split=None, folder=None, table=None,
            image_column=None, label_column=None, batch_size=0, skip_corrupt=False,
            overwrite=False):
  """Writes `out`; returns (examples, probabilities, metrics on the labelled patches)."""
  from camkd_jax import inference  # pylint: disable=g-import-not-at-top
  given = [n for n, v in (('--split', split), ('--folder', folder), ('--table', table)) if v]
  if len(given) != 1:
    raise base.DataError(f'give exactly one of --split, --folder, --table (got {given or "none"})')
  if os.path.exists(out) and not overwrite:
    raise base.DataError(f'--out {out} exists; choose another name or pass --overwrite')
  run_model = inference.load_run_model(workdir, which)
  config = run_config(workdir)
  names = list(run_model.class_names)
  if split:
    examples = split_examples(config, split, names)
  else:
    paths, labels = (folder_examples(folder, names) if folder else table_examples(
        table, names, image_column or config.data.get('image_column', 'image'),
        label_column or config.data.get('label_column', '')))
    examples = checked_examples(paths, labels, folder or table, skip_corrupt)
  probs = predict_probabilities(run_model, examples, batch_size or config.eval_batch_size)
  write_predictions(out, examples, probs, names)
  return examples, probs, summary(examples, probs, len(names))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_logging()
  with cli.user_errors():
    examples, _, m = predict(FLAGS.workdir, FLAGS.out, FLAGS.model, FLAGS.split, FLAGS.folder,
                             FLAGS.table, FLAGS.image_column, FLAGS.label_column,
                             FLAGS.batch_size, FLAGS.skip_corrupt, FLAGS.overwrite)
  line = f'wrote {len(examples)} predictions ({FLAGS.model}) to {FLAGS.out}'
  if m:
    line += (f'; on the {m["num_examples"]} labelled: accuracy {m["accuracy"]:.4f}, balanced '
             f'accuracy {m["balanced_accuracy"]:.4f}, kappa {m["kappa"]:.4f}')
  print(line)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
