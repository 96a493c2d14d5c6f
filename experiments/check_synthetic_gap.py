r"""Does synthetic_histology need resolution? A quick check, independent of the trainer.

Trains a CNN with cross-entropy only on the full-resolution images and on the student's views
(average-pool f x f, bilinear upsample back, align_corners=True: camkd_jax.ops.student_view) and
prints balanced accuracy on the validation and test splits. Two colour-only baselines show that
colour does not give the class away: logistic regression on the mean colour of each image and on
the x16 average-pooled image.

  python experiments/check_synthetic_gap.py --model small --small_width 8 --epochs 8 \
      --factors 1,2,4,8                                  # the numbers in the README (~15 min)
  python experiments/check_synthetic_gap.py --model vgg  # VGG16 width 0.125 (slower)
  # the `fine` variant's structure scale, chosen on validation (docs/data.md, "The fine variant")
  python experiments/check_synthetic_gap.py --model small --small_width 16 --epochs 6 \
      --factors 4,1 --structure_scale 0.5 --splits validation

Uses camkd_jax.input_pipeline to load the data (balanced oversampling as in the reference) and
camkd_jax.models.vgg for the network; no augmentation, no distillation.
"""
import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import confusion_matrix
from sklearn.preprocessing import StandardScaler

from camkd_jax import input_pipeline
from camkd_jax import metrics
from camkd_jax import ops
from camkd_jax.datasets import synthetic_histology as sh
from camkd_jax.models import vgg
from configs import base as base_config


class SmallCNN(nn.Module):
  """Three conv stages + GAP: a fast stand-in for the VGG (--model small)."""
  num_classes: int
  width: int = 16

  @nn.compact
  def __call__(self, x):
    w = self.width
    for ch in (w, 2 * w, 4 * w):
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.max_pool(nn.relu(nn.Conv(ch, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.Conv(4 * w, (3, 3))(x)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2))), {}


def load_split(data, split):
  images, labels = [], []
  for b in data.eval_batches(split):
    images.append(b['image'][b['mask']])
    labels.append(b['label'][b['mask']])
  return np.concatenate(images), np.concatenate(labels)


def in_memory(size, structure_scale, seed):
  """The splits of builder config `size` at another structure_scale, drawn in memory with the
  builder's labels and per-example seeds (what the builder would store: PNG is lossless), and a
  stand-in for the pipeline's data object (balanced order per (seed, epoch), batch 32)."""
  cfg = next(c for c in sh.SyntheticHistology.BUILDER_CONFIGS if c.name == size)
  out = {}
  for s, (split, n) in enumerate([('train', cfg.num_train), ('validation', cfg.num_validation),
                                  ('test', cfg.num_test)]):
    labels = sh.split_labels(n, cfg.seed, s)
    out[split] = (np.stack([sh.render_patch(np.random.default_rng([cfg.seed, s, i]), int(y),
                                            cfg.image_size, structure_scale)
                            for i, y in enumerate(labels)]), labels.astype(np.int32))
  batch = 32
  steps = cfg.num_train // batch
  data = types.SimpleNamespace(
      num_classes=len(sh.CLASS_NAMES), class_names=list(sh.CLASS_NAMES),
      image_size=cfg.image_size, steps_per_epoch=steps, global_batch_size=batch,
      num_examples={k: len(v[1]) for k, v in out.items()},
      train_order=lambda epoch: input_pipeline.epoch_order(out['train'][1], len(sh.CLASS_NAMES),
                                                           seed, epoch, True, steps * batch))
  return data, out


def pooled(images, f):
  n, h, w, c = images.shape
  return images.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4)).reshape(n, -1) / 255.0


def linear_baseline(train, test, features):
  """Balanced accuracy of class-weighted logistic regression on `features`(images)."""
  scaler = StandardScaler().fit(features(train[0]))
  clf = LogisticRegression(max_iter=2000, class_weight='balanced', C=1.0)
  clf.fit(scaler.transform(features(train[0])), train[1])
  return balanced_accuracy_score(test[1], clf.predict(scaler.transform(features(test[0]))))


def train_cnn(args, data, train, evals, factor):
  """Trains one model on the factor-f view; returns {split: balanced accuracy}."""
  if args.model == 'vgg':
    model = vgg.VGG(num_classes=data.num_classes, width=args.width)
  else:
    model = SmallCNN(num_classes=data.num_classes, width=args.small_width)
  s = data.image_size
  params = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, s, s, 3)))
  steps = args.epochs * data.steps_per_epoch
  tx = optax.adam(optax.cosine_decay_schedule(args.lr, steps, 0.05))
  opt = tx.init(params)

  # Inputs standardised with the training set's per-channel statistics: the images are
  # low-contrast (pink on pink), and this check is about what the views contain, not about how
  # hard [0, 1] inputs make optimisation.
  if args.standardize:
    mean = jnp.asarray(train[0].reshape(-1, 3).mean(0) / 255.0, jnp.float32)
    std = jnp.asarray(train[0].reshape(-1, 3).std(0) / 255.0, jnp.float32)
  else:  # the reference's input: x / 255
    mean, std = jnp.zeros(3), jnp.ones(3)

  def view(x):
    return (ops.student_view(x.astype(jnp.float32) / 255.0, factor) - mean) / std

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      logits, _ = model.apply(p, view(x))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  @jax.jit
  def predict(params, x):
    return model.apply(params, view(x))[0].argmax(-1)

  images, labels = train
  b = data.global_batch_size
  for epoch in range(args.epochs):
    order = data.train_order(epoch)
    for k in range(data.steps_per_epoch):
      idx = order[k * b:(k + 1) * b]
      params, opt, loss = step(params, opt, images[idx], labels[idx])
  out = {}
  for split, (x, y) in evals.items():
    pred = np.concatenate([np.asarray(predict(params, x[i:i + 256]))
                           for i in range(0, len(x), 256)])
    out[split] = balanced_accuracy_score(y, pred)
    out[split + '_pred'] = pred
    out[split + '_confusion'] = confusion_matrix(y, pred, labels=range(data.num_classes))
  out['final_loss'] = float(loss)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', default='default', help='synthetic_histology builder config')
  p.add_argument('--data_dir', default='', help='TFDS data dir ("" = TFDS default)')
  p.add_argument('--factors', default='1,4,8')
  p.add_argument('--epochs', type=int, default=6)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--model', default='vgg', choices=['vgg', 'small'])
  p.add_argument('--width', type=float, default=0.125)
  p.add_argument('--small_width', type=int, default=16, help='channels of --model small')
  p.add_argument('--standardize', type=int, default=1,
                 help='1: per-channel standardised inputs; 0: x / 255 as in the reference')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--structure_scale', type=float, default=0.0,
                 help='draw the splits in memory at this structure scale (0: read the builder)')
  p.add_argument('--splits', default='validation,test',
                 help='evaluated splits (choose parameters on validation only)')
  args = p.parse_args()
  splits = args.splits.split(',')

  config = base_config.base_config('smoke=1' if args.size == 'smoke' else '')
  config.data.synthetic_size = args.size
  config.data.data_dir = args.data_dir
  config.seed = args.seed
  t0 = time.time()
  if args.structure_scale:
    data, arrays = in_memory(args.size, args.structure_scale, args.seed)
    train, evals = arrays['train'], {s: arrays[s] for s in splits}
  else:
    data = input_pipeline.get_data(config, process_index=0, process_count=1)
    train = load_split(data, 'train')
    evals = {s: load_split(data, s) for s in splits}
  print(f'data {args.size}: {data.num_examples}, image_size {data.image_size}, '
        f'loaded in {time.time() - t0:.0f}s; train class counts '
        f'{np.bincount(train[1], minlength=data.num_classes).tolist()}')
  mean_colour = lambda x: x.reshape(len(x), -1, 3).mean(1)
  shares = [sh.class_spectrum_share(train[0], train[1], c) for c in (1 / 8, 1 / 4)]
  print(f'share of the between-class spectral variance (train split) at periods <= 8 px: '
        f'{shares[0]:.2f}, <= 4 px: {shares[1]:.2f}', flush=True)
  for name, feats in [('mean colour', mean_colour),
                      ('x16 pooled', lambda x: pooled(x, 16)),
                      ('x8 pooled', lambda x: pooled(x, 8))]:
    accs = [linear_baseline(train, evals[s], feats) for s in splits]
    print(f'logistic regression on {name:12s}: balanced acc '
          + ' '.join(f'{s} {a:.3f}' for s, a in zip(splits, accs)), flush=True)
  for f in [int(v) for v in args.factors.split(',') if v.strip()]:  # --factors= : no CNN
    t = time.time()
    r = train_cnn(args, data, train, evals, f)
    kappa = {s: metrics.quadratic_kappa(evals[s][1], r[s + '_pred'], data.num_classes)
             for s in splits}
    print(f'{args.model} CE, factor x{f:<2d}: '
          + ' '.join(f'{s} balanced acc {r[s]:.3f} kappa {kappa[s]:.3f}' for s in splits)
          + f' (final loss {r["final_loss"]:.3f}, {time.time() - t:.0f}s); {splits[-1]} '
          f'confusion (rows = true {data.class_names}) {r[splits[-1] + "_confusion"].tolist()}',
          flush=True)


if __name__ == '__main__':
  main()
