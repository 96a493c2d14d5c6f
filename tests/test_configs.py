"""configs/: typed key=value arguments, the error for an unknown key, the named parts."""
import pytest

from configs import attn_kd
from configs import base


def test_arguments_are_parsed_with_their_types():
  args = base.parse_arg('magnification=1.25,seeds=22,32,43,smoke=yes,dataset=folder,root=/r')
  assert args == {'magnification': 1.25, 'seeds': (22, 32, 43), 'smoke': True,
                  'dataset': 'folder', 'root': '/r'}
  assert base.parse_arg('seeds=22;32,smoke=0') == {'seeds': (22, 32), 'smoke': False}
  assert base.parse_arg('') == {} and base.parse_arg(None) == {}


def test_arguments_reach_the_config():
  c = attn_kd.get_config('magnification=1.25,seeds=22,32,43,dataset=sicapv2,data_dir=/d')
  assert (c.magnification, c.seeds) == (1.25, '22,32,43')
  assert (c.data.name, c.data.data_dir, c.data.manual_dir) == ('sicapv2', '/d', '/d')
  assert (c.image_size, c.model.width, c.num_epochs) == (512, 1.0, 20)
  smoke = attn_kd.get_config('smoke=1')
  assert (smoke.image_size, smoke.model.width, smoke.max_steps) == (32, 0.0625, 3)
  assert smoke.data.synthetic_size == 'smoke'
  assert attn_kd.get_config('smoke=0').image_size == 64


@pytest.mark.parametrize('arg, message', [
    ('magnifcation=2', "unknown config argument 'magnifcation' (did you mean 'magnification'?)"),
    ('sed=1', "unknown config argument 'sed' (did you mean 'seeds'?)"),
    ('zzz=1', "unknown config argument 'zzz' in 'zzz=1'; known: ['data_dir', 'dataset', "),
    ('magnification=x', "config argument magnification='x' is not a number"),
    ('smoke=maybe', "config argument smoke='maybe' is not a boolean"),
    ('seeds=22,x', "config argument seeds='22,x' is not comma-separated integers"),
    ('oops', "config argument 'oops' is not key=value (in 'oops')"),
    ('dataset=imagenet', "unknown dataset 'imagenet'; known: ['folder', 'sicapv2', "),
])
def test_bad_arguments_give_one_clear_error(arg, message):
  with pytest.raises(ValueError) as info:
    attn_kd.get_config(arg)
  assert str(info.value).startswith(message), str(info.value)


def test_parts_are_the_config_sections():
  c = base.base_config()
  assert c.loss.to_dict() == base.loss_config().to_dict()
  assert c.attention.to_dict() == base.attention_config().to_dict()
  assert c.augment.to_dict() == base.augment_config().to_dict()
  assert (c.optimizer.name, c.optimizer.learning_rate) == ('adam', 1e-4)
  assert (c.selection.metric, c.selection.min_delta) == ('kappa', 0.01)
  assert 'shuffle_buffer' not in c
