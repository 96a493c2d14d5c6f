"""The ONNX graph of a run model, built node by node from its parameters, and its
probabilities under onnxruntime. Needs the `onnx` extra (onnx, onnxruntime); no torch."""
import json

import numpy as np

from camkd_jax.export.model import (ONNX_INPUTS, ONNX_OPSET, ExportError, conv_blocks,
                                    description, standardisation, torchvision_state, upsampled)


def onnx_model(run_model, input_dtype: str = 'uint8'):
  """onnx.ModelProto: tiles (N, t, t, 3) at the model's magnification -> probabilities, logits.

  Built node by node from the parameters (a VGG is 13 Conv + Relu, 4 MaxPool, a global average
  pool and a Gemm), in the JAX model's order: / 255, the view's upsampling, (x - mean) / std."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=g-import-not-at-top
  if input_dtype not in ONNX_INPUTS:
    raise ExportError(f'--onnx_input {input_dtype!r}: choose one of {list(ONNX_INPUTS)}')
  t, c = run_model.tile_size, len(run_model.class_names)
  state = torchvision_state(run_model)
  nodes, inits = [], []

  def const(name, value):
    inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name

  def node(op, inputs, name, **attrs):
    nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    return name

  x = 'tiles'
  if input_dtype == 'uint8':
    x = node('Cast', [x], 'as_float', to=TensorProto.FLOAT)
  x = node('Transpose', [x], 'nchw', perm=[0, 3, 1, 2])
  x = node('Div', [x, const('c255', 255.0)], 'unit_range')
  if upsampled(run_model):
    f = float(run_model.factor)
    x = node('Resize', [x, '', const('view_scales', [1.0, 1.0, f, f])], 'student_view',
             mode='linear', coordinate_transformation_mode='align_corners')
  if run_model.model.input_mean is not None:
    mean, std = standardisation(run_model)
    x = node('Sub', [x, const('input_mean', np.reshape(mean, (1, 3, 1, 1)))], 'centred')
    x = node('Div', [x, const('input_std', np.reshape(std, (1, 3, 1, 1)))], 'standardised')
  blocks = conv_blocks(run_model)
  for b, indices in enumerate(blocks):
    for j, idx in enumerate(indices):
      w = const(f'features.{idx}.weight', state[f'features.{idx}.weight'])
      bias = const(f'features.{idx}.bias', state[f'features.{idx}.bias'])
      x = node('Conv', [x, w, bias], f'features.{idx}', kernel_shape=[3, 3], pads=[1, 1, 1, 1])
      if not (b == len(blocks) - 1 and j == len(indices) - 1):  # block5 ends without a ReLU
        x = node('Relu', [x], f'features.{idx + 1}')
    if b < len(blocks) - 1:
      x = node('MaxPool', [x], f'features.{indices[-1] + 2}', kernel_shape=[2, 2],
               strides=[2, 2])
  x = node('GlobalAveragePool', [x], 'gap')
  x = node('Flatten', [x], 'pooled', axis=1)
  head_w = const('classifier.weight', state['classifier.weight'])
  logits = node('Gemm', [x, head_w, const('classifier.bias', state['classifier.bias'])],
                'logits', transB=1)
  node('Softmax', [logits], 'probabilities', axis=-1)
  elem = TensorProto.UINT8 if input_dtype == 'uint8' else TensorProto.FLOAT
  graph = helper.make_graph(
      nodes, 'camkd_jax', [helper.make_tensor_value_info('tiles', elem, ['N', t, t, 3])],
      [helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, ['N', c]),
       helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['N', c])], inits)
  model = helper.make_model(graph, producer_name='camkd_jax',
                            opset_imports=[helper.make_opsetid('', ONNX_OPSET)])
  model.ir_version = 8  # onnxruntime >= 1.14 and the other runtimes of opset 17 read IR 8
  helper.set_model_props(model, {k: json.dumps(v) for k, v in description(run_model).items()})
  onnx.checker.check_model(model, full_check=True)
  return model


def onnx_probabilities(path: str, tiles: np.ndarray) -> np.ndarray:
  """Probabilities of `tiles` under onnxruntime (CPU)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  ort_session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  want = ort_session.get_inputs()[0].type
  x = tiles if want == 'tensor(uint8)' else tiles.astype(np.float32)
  return ort_session.run(['probabilities'], {'tiles': x})[0]
