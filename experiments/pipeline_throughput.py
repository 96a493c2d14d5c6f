r"""Throughput of the input pipeline alone (read, decode, resize, balance, batch) on this CPU.

Writes a few hundred synthetic 512x512 JPEG patches (H&E-like, SICAPv2-sized files) into a temp
folder dataset, then times `Data.train_batches` and reports images/s of wall time and images per
CPU-second (= per fully used core), and how many cores would feed a GPU at --target images/s.

  python experiments/pipeline_throughput.py                      # 256 JPEGs, 512 px, 2 epochs
  python experiments/pipeline_throughput.py --image_size 256     # with a resize in the map
  python experiments/pipeline_throughput.py --layout sicapv2     # via the sicapv2 TFDS builder

CPU time is the process's user+system time (decoding threads included), so the per-core figure
does not depend on how many cores the process got; on a shared machine trust it over wall time.
"""
import argparse
import io
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image

from camkd_jax import input_pipeline
from camkd_jax.datasets import synthetic_histology as sh
from configs import base as base_config


def make_patches(root, n, size, quality, seed=0):
  """n JPEGs in root/<class>/, drawn at size/4 and upsampled (with sensor noise) to size."""
  rng = np.random.default_rng(seed)
  nbytes = 0
  for i in range(n):
    k = i % len(sh.CLASS_NAMES)
    small = sh.render_patch(np.random.default_rng([seed, 7, i]), k, size // 4)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (size, size, 3))
    path = os.path.join(root, sh.CLASS_NAMES[k], f'{i:05d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    b = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(b, 'JPEG', quality=quality)
    with open(path, 'wb') as f:
      f.write(b.getvalue())
    nbytes += len(b.getvalue())
  return nbytes / n


def as_sicapv2(root):
  """Rearranges root/<class>/*.jpg into a SICAPv2-shaped archive (all images in every split)."""
  import openpyxl  # pylint: disable=g-import-not-at-top
  archive = os.path.join(root, 'archive')
  os.makedirs(os.path.join(archive, 'images'))
  rows = []
  for k, c in enumerate(sh.CLASS_NAMES):
    for name in sorted(os.listdir(os.path.join(root, c))):
      os.rename(os.path.join(root, c, name), os.path.join(archive, 'images', f'{c}_{name}'))
      rows.append([f'{c}_{name}'] + [int(j == k) for j in range(4)] + [0])
  for part in ('Validation/Val1/Train', 'Validation/Val1/Test', 'Test/Test'):
    path = os.path.join(archive, 'partition', part + '.xlsx')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    wb = openpyxl.Workbook()
    wb.active.append(['image_name', 'NC', 'G3', 'G4', 'G5', 'G4C'])
    for r in rows:
      wb.active.append(r)
    wb.save(path)
  return archive


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--num_images', type=int, default=256)
  p.add_argument('--source_size', type=int, default=512, help='JPEG side in pixels')
  p.add_argument('--image_size', type=int, default=512, help='config.image_size (resize target)')
  p.add_argument('--quality', type=int, default=90, help='JPEG quality')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--epochs', type=int, default=2)
  p.add_argument('--target', type=float, default=900.0, help='images/s one GPU consumes')
  p.add_argument('--layout', default='folder', choices=['folder', 'sicapv2'],
                 help='folder: files read in the map; sicapv2: fake archive -> TFDS build, '
                      'encoded bytes held in memory (the SICAPv2 path)')
  args = p.parse_args()

  root = tempfile.mkdtemp(prefix='camkd_throughput_')
  try:
    t = time.time()
    mean_bytes = make_patches(root, args.num_images, args.source_size, args.quality)
    print(f'wrote {args.num_images} JPEGs of {args.source_size}px (mean {mean_bytes / 1e3:.0f} kB, '
          f'quality {args.quality}) in {time.time() - t:.0f}s')
    if args.layout == 'folder':
      config = base_config.base_config('dataset=folder')
      config.data.root = root
      config.data.split_ratio = (1.0, 0.0, 0.0)  # every image in train
    else:
      config = base_config.base_config('dataset=sicapv2')
      config.data.manual_dir = as_sicapv2(root)
      config.data.data_dir = os.path.join(root, 'tfds')
      t = time.time()
    config.image_size = args.image_size
    config.batch_size = args.batch_size
    data = input_pipeline.get_data(config, process_index=0, process_count=1)
    if args.layout == 'sicapv2':
      print(f'built the TFDS dataset (3 splits, each image checked once) in {time.time() - t:.0f}s')
    # Warm-up: one batch builds the tf.data graph and fills the page cache.
    next(data.train_batches(99))
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for epoch in range(args.epochs):
      for batch in data.train_batches(epoch):
        n += len(batch['label'])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  finally:
    shutil.rmtree(root, ignore_errors=True)
  per_core = n / cpu
  print(f'{args.layout}: {n} images {args.source_size}px JPEG -> {args.image_size}px, batch '
        f'{args.batch_size}, balanced: {n / wall:.0f} images/s wall ({os.cpu_count()} visible '
        f'cores), {per_core:.0f} images per CPU-second')
  print(f'cores to feed {args.target:.0f} images/s: {args.target / per_core:.1f} '
        f'(at {per_core:.0f} images/s per core)')


if __name__ == '__main__':
  main()
