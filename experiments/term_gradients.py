r"""How much each loss term pulls on the student: gradient norms and directions per term.

For one cell of the study (experiments/reproduce.py) this evaluates, on the first training
batches (the same augmented views the step sees), every active term L_i of the student objective
and the gradient of its *weighted* contribution a_i L_i with respect to the student parameters:

  |a_i grad L_i|         how hard the term pulls (compare with CE's),
  cos(a_i grad L_i, grad CE)  whether it pulls the way CE does (0 = orthogonal, < 0 = against),
  share                 |a_i grad L_i| / sum_j |a_j grad L_j|.

at the student's random initialisation and at its selected (best-on-validation) checkpoint.

  python experiments/term_gradients.py --workdir=/work/study2/runs --method=fm_at \
      --magnification=2.5 --seed=22 --batches=4
  # any config field, as in reproduce.py: what if a_at were 1?
  python experiments/term_gradients.py ... --set=loss.at=1

Prints a markdown table (and writes it with --out). Needs the cell's teacher (workdir/teacher_s<seed>)
and, for the 'best' row, the finished cell (workdir/<method>_m<mag>_s<seed>/student).
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the study --workdir')
  p.add_argument('--method', default='fm_at', help='ce | kd | fm | at | fm_at')
  p.add_argument('--magnification', type=float, default=2.5)
  p.add_argument('--seed', type=int, default=22)
  p.add_argument('--dataset', default='synthetic_histology')
  p.add_argument('--data_dir', default='')
  p.add_argument('--smoke', action='store_true')
  p.add_argument('--protocol', default='', choices=('', 'default', 'paper'),
                 help='config argument protocol=... (as reproduce.py)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  p.add_argument('--batches', type=int, default=4, help='training batches averaged over')
  p.add_argument('--points', default='init,best',
                 help="parameter sets: 'init' (the student's configured initialisation: random, "
                      "ImageNet or teacher copy), 'random' (random init, for comparison), 'best'")
  p.add_argument('--per_layer', action='store_true',
                 help="also a table of each term's share of every layer's gradient norm "
                      '(Adam normalises per parameter, so a term that owns one layer steers it)')
  p.add_argument('--out', default='', help='also write the markdown table here')
  return p.parse_args(argv)


def cell_config(args):
  import reproduce  # pylint: disable=g-import-not-at-top
  return reproduce.method_config(args.method, reproduce.config_arg(args, args.magnification),
                                 args.seed, args.set)


def term_gradients(step_cfg, model, params, teacher_params, x, labels):
  """{term: (value, grad pytree of a_term * L_term)} for every active term."""
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import distill  # pylint: disable=g-import-not-at-top

  # One forward for all terms; jacrev runs one (vmapped) backward per term from it.
  def weighted(p):
    _, terms = distill.compute_losses(step_cfg, model, p, model, teacher_params, x, labels)
    return {t: step_cfg.weight(t) * v for t, v in terms.items()}, terms
  grads, values = jax.jacrev(weighted, has_aux=True)(params)
  return {t: (values[t], grads[t]) for t in step_cfg.active_terms}


def map_spans(step_cfg, map_name, model, params, teacher_params, x, labels):
  """{layer: (student spans, teacher spans)}: per-sample max - min of the raw saliency stacks,
  the denominator of min-max normalisation (the AT+ gradient scales with its inverse)."""
  from camkd_jax import distill, ops, saliency  # pylint: disable=g-import-not-at-top
  layers = step_cfg.saliency.layers
  map_fn = saliency.MAPS[map_name].fn
  s = distill._forward(model, params, ops.student_view(x, step_cfg.factor), layers)  # pylint: disable=protected-access
  t = distill._forward(model, teacher_params, x, layers)  # pylint: disable=protected-access
  span = lambda m: m.reshape(m.shape[0], -1).max(-1) - m.reshape(m.shape[0], -1).min(-1)
  return {layer: (span(map_fn(s, layer, labels)), span(map_fn(t, layer, labels)))
          for layer in layers}


def layer_norms(tree):
  """{top-level parameter group (a layer): L2 norm over its leaves}, in float64."""
  import jax  # pylint: disable=g-import-not-at-top
  return {name: float(np.sqrt(sum(np.sum(np.asarray(l, np.float64) ** 2)
                                  for l in jax.tree_util.tree_leaves(sub))))
          for name, sub in tree.items()}


def _layer_key(name):
  return (0, int(name.split('_')[-1])) if name.startswith('features_') else (1, name)


def flat(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.asarray(l, np.float64).ravel()
                         for l in jax.tree_util.tree_leaves(tree)])


def summarise(per_batch, weights):
  """Mean over batches of value, |grad|, cos to CE and share, per term."""
  rows = {}
  for term in per_batch[0]:
    vals, norms, coss, shares = [], [], [], []
    for b in per_batch:
      g = b[term][1]
      n = np.linalg.norm(g)
      total = sum(np.linalg.norm(b[t][1]) for t in b)
      vals.append(b[term][0])
      norms.append(n)
      shares.append(n / total if total > 0 else np.nan)
      if 'ce' in b:
        c = b['ce'][1]
        denom = n * np.linalg.norm(c)
        coss.append(float(g @ c / denom) if denom > 0 else np.nan)
    rows[term] = dict(weight=weights[term], value=np.mean(vals), norm=np.mean(norms),
                      cos=np.mean(coss) if coss else np.nan, share=np.mean(shares))
  return rows


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from camkd_jax import checkpoints, config_checks, distill, input_pipeline, models, runs
  from camkd_jax import sharding, stage as stage_lib, teacher as teacher_lib, weights
  # pylint: enable=g-import-not-at-top
  config = cell_config(args)
  mesh = sharding.make_mesh()
  data = input_pipeline.get_data(config)
  config = input_pipeline.resolve_input_stats(config, data)  # model.input_mean/std = 'auto'
  model = models.from_config(config.model, data.num_classes)
  _, step_cfg = config_checks.step_configs(config)
  template = teacher_lib.abstract_params(model, data.image_size, mesh)
  teacher_dir = os.path.join(args.workdir, f'teacher_s{args.seed}', 'teacher')
  if not runs.is_finished_model(teacher_dir):
    raise SystemExit(f'no finished teacher at {teacher_dir}: run experiments/reproduce.py first')
  teacher_params, _ = checkpoints.load_model(teacher_dir, template)
  cell = os.path.join(args.workdir, f'{args.method}_m{args.magnification:g}_s{args.seed}')
  points = {}
  for point in args.points.split(','):
    if point == 'init':
      stage = stage_lib.Stage('student', config, cell, model, step_cfg, 1,
                              *stage_lib.stage_seeds(args.seed, 2), teacher_model=model,
                              teacher_params=teacher_params)
      init = weights.stage_init(config, 'student')
      points[f"init ({init['weights'] or 'random'}, head {init['head']})"] = (
          stage_lib.stage_init_params(stage, data.image_size))
    elif point == 'random':
      points['random init'] = stage_lib.init_params(
          model, stage_lib.stage_seeds(args.seed, 2)[0], data.image_size)
    elif point == 'best':
      path = os.path.join(cell, 'student')
      if not runs.is_finished_model(path):
        raise SystemExit(f'no finished student at {path}: finish the cell or use --points=init')
      points['best'], meta = checkpoints.load_model(path, template)
      points[f'best (epoch {(meta.get("report") or {}).get("epoch")})'] = points.pop('best')
    else:
      raise SystemExit(f'--points: unknown {point!r}; use init, random and/or best')

  grads_fn = jax.jit(lambda p, x, y: term_gradients(step_cfg, model, p, teacher_params, x, y))
  spans_fn = jax.jit(lambda p, x, y: map_spans(step_cfg, config.attention.map, model, p,
                                               teacher_params, x, y))
  rng = jax.random.PRNGKey(stage_lib.stage_seeds(args.seed, 2)[1])
  batches = []
  for i, batch in enumerate(data.train_batches(0)):
    if i == args.batches:
      break
    x = distill.prepare_images(batch['image'], jax.random.fold_in(rng, i), step_cfg.augment)
    batches.append((x, batch['label']))

  weights = dict(step_cfg.weights)
  lines = [f'Per-term gradients, {args.method} at {args.magnification:g}x, seed {args.seed}, '
           f'mean over {len(batches)} training batches of {data.global_batch_size} '
           f'(`python experiments/term_gradients.py {" ".join(sys.argv[1:])}`)', '',
           '| parameters | term | weight | value | weighted grad norm | cos to CE grad | share |',
           '|---|---|---|---|---|---|---|']
  span_lines, layer_lines = [], []
  for name, params in points.items():
    per_batch, per_layer = [], []
    for x, y in batches:
      out = grads_fn(params, x, y)
      per_batch.append({t: (float(v), flat(g)) for t, (v, g) in out.items()})
      if args.per_layer:
        per_layer.append({t: layer_norms(g) for t, (_, g) in out.items()})
    if per_layer:
      terms = list(per_layer[0])
      for layer in sorted(per_layer[0][terms[0]], key=_layer_key):
        shares = []
        for t in terms:
          vals = [b[t][layer] / max(sum(b[u][layer] for u in terms), 1e-30) for b in per_layer]
          shares.append(float(np.mean(vals)))
        layer_lines.append(f'| {name} | {layer} | ' + ' | '.join(f'{v:.2f}' for v in shares)
                           + ' |')
    for term, r in summarise(per_batch, weights).items():
      lines.append(f'| {name} | {term} | {r["weight"]:g} | {r["value"]:.4f} | {r["norm"]:.4g} '
                   f'| {r["cos"]:+.3f} | {r["share"]:.2f} |')
    if 'at' in weights and weights['at']:
      spans = [spans_fn(params, x, y) for x, y in batches]
      for layer in spans[0]:
        st = np.concatenate([np.asarray(b[layer][0]) for b in spans])
        te = np.concatenate([np.asarray(b[layer][1]) for b in spans])
        span_lines.append(f'| {name} | {layer} | {np.median(st):.3g} | {np.median(te):.3g} '
                          f'| {np.median(te) / max(np.median(st), 1e-30):.3g} |')
  if layer_lines:
    lines += ['', "Share of each layer's gradient norm, per term (mean over the batches):", '',
              '| parameters | layer | ' + ' | '.join(terms) + ' |',
              '|---|---|' + '---|' * len(terms)]
    lines += layer_lines
  if span_lines:
    lines += ['', f'Raw saliency-map range max - min per sample ({config.attention.map}, median '
              'over the batches), the min-max denominator:', '',
              '| parameters | layer | student | teacher | teacher / student |', '|---|---|---|---|---|']
    lines += span_lines
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  return text


if __name__ == '__main__':
  main()
