r"""Tiles per second of an exported student (ONNX Runtime; TorchScript) beside
camkd_jax.inference.Predictor (JAX) for the same model and the same tiles, on this machine's CPU.

  python experiments/export_throughput.py --workdir RUN --export DIR [--tiles 2048] [--rounds 5]

DIR is `python -m camkd_jax.export --workdir RUN --format all --out DIR`. The tiles are random
uint8 tiles of the model's tile size (the speed does not depend on the content), predicted in
batches of --batch_size by each runtime in turn; after one untimed warm-up pass each (XLA
compiles, ONNX Runtime and torch plan their kernels), --rounds interleaved rounds, so load from
other processes falls on every runtime alike; per runtime the median and the best round are
printed, with the largest probability difference from JAX over all tiles. Each runtime uses its
default thread count (all cores).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from camkd_jax import inference  # pylint: disable=wrong-import-position


def cpu_name() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    name = [l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name')]
    flags = open('/proc/cpuinfo').read()
    return (f'{name[0] if name else platform.processor()}, '
            f'{"AVX-512" if "avx512f" in flags else "no AVX-512"}, {os.cpu_count()} cores')
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or 'unknown CPU'


def batches(tiles, batch_size):
  return [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]


def runners(run_model, export_dir, batch_size):
  """{name: predict(tiles) -> probabilities}."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  out = {}
  predictor = inference.Predictor(run_model, batch_size=batch_size)
  out['JAX (camkd_jax.inference.Predictor)'] = predictor.predict
  ort_session = ort.InferenceSession(os.path.join(export_dir, 'model.onnx'),
                                     providers=['CPUExecutionProvider'])
  out['ONNX Runtime (model.onnx)'] = lambda tiles: np.concatenate(
      [ort_session.run(['probabilities'], {'tiles': b})[0] for b in batches(tiles, batch_size)])
  ts_path = os.path.join(export_dir, 'torchscript_model.pt')
  if os.path.isfile(ts_path):
    import torch  # pylint: disable=g-import-not-at-top
    with open(os.path.join(export_dir, 'config.json')) as f:
      norm = [s for s in json.load(f)['transform'] if s['name'] == 'Normalize'][0]['arguments']
    module = torch.jit.load(ts_path)
    mean = torch.tensor(norm['mean']).reshape(1, 3, 1, 1)
    std = torch.tensor(norm['std']).reshape(1, 3, 1, 1)

    def torchscript(tiles):
      with torch.no_grad():
        return np.concatenate([torch.softmax(module(
            (torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255.0 - mean) / std), 1).numpy()
                               for b in batches(tiles, batch_size)])
    out[f'TorchScript (torch {torch.__version__})'] = torchscript
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--export', required=True, help='the export folder of the run\'s student')
  p.add_argument('--model', default='student')
  p.add_argument('--tiles', type=int, default=2048)
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--rounds', type=int, default=5)
  a = p.parse_args()
  rm = inference.load_run_model(a.workdir, a.model)
  t = rm.tile_size
  tiles = np.random.default_rng(0).integers(0, 256, (a.tiles, t, t, 3), dtype=np.uint8)
  fns = runners(rm, a.export, a.batch_size)
  reference, diffs = None, {}
  for name, fn in fns.items():  # warm-up, and agreement over all tiles
    probs = fn(tiles)
    reference = probs if reference is None else reference
    diffs[name] = float(np.abs(probs - reference).max())
  times = {name: [] for name in fns}
  for _ in range(a.rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn(tiles)
      times[name].append(time.perf_counter() - t0)
  print(f'{a.model} of {a.workdir}: {rm.magnification:g}x, {t} px tiles, view {rm.view} '
        f'(network input {rm.input_size} px), {a.tiles} tiles in batches of {a.batch_size}, '
        f'{a.rounds} interleaved rounds; CPU: {cpu_name()}')
  jax_rate = a.tiles / statistics.median(times[next(iter(fns))])
  print('| runtime | tiles/s (median) | best round | vs JAX | max prob. diff vs JAX |')
  print('|---|---|---|---|---|')
  for name, ts in times.items():
    rate = a.tiles / statistics.median(ts)
    print(f'| {name} | {rate:.0f} | {a.tiles / min(ts):.0f} | {rate / jax_rate:.2f}x | '
          f'{diffs[name]:.1e} |')


if __name__ == '__main__':
  main()
