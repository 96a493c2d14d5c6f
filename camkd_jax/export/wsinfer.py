"""A WSInfer model directory's two files: the TorchScript module (torchvision's VGG layout,
traced) and WSInfer's model config (schema 1.0); and the probabilities WSInfer computes from
them. Needs the `export` extra (torch)."""
import warnings
from typing import Any, Dict

import numpy as np

from camkd_jax.export.model import (PIL_BOX, architecture, conv_blocks, model_mpp,
                                    standardisation, torchvision_state, upsampled)


def torch_module(run_model):
  """A torch.nn.Module (N, 3, t, t) standardised float -> logits, built from the parameters:
  `features` is torchvision's VGG layout (Conv2d / ReLU / MaxPool2d at torchvision's indices,
  loaded with load_state_dict(strict=True) from weights.flax_to_torchvision), then global
  average pooling and the Linear head."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  state = torchvision_state(run_model)
  blocks = conv_blocks(run_model)
  layers, in_ch = [], 3
  for b, indices in enumerate(blocks):
    for j, idx in enumerate(indices):
      assert len(layers) == idx, (len(layers), idx)
      out_ch = state[f'features.{idx}.weight'].shape[0]
      layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
      in_ch = out_ch
      if not (b == len(blocks) - 1 and j == len(indices) - 1):
        layers.append(nn.ReLU())
    if b < len(blocks) - 1:
      layers.append(nn.MaxPool2d(2, 2))
  size = run_model.image_size if upsampled(run_model) else 0

  class Classifier(nn.Module):
    """Upsampling of the student view (align-corners, fixed size), VGG trunk, GAP, head."""

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.classifier = nn.Linear(in_ch, len(run_model.class_names))

    def forward(self, x):
      if size:
        x = nn.functional.interpolate(x, size=(size, size), mode='bilinear', align_corners=True)
      return self.classifier(self.features(x).mean(dim=(2, 3)))

  module = Classifier()
  module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                          for k, v in state.items()}, strict=True)
  return module.eval()


def write_torchscript(run_model, path: str):
  """Traces the module on a (2, 3, t, t) example (the batch stays free) and saves it."""
  import torch  # pylint: disable=g-import-not-at-top
  t = run_model.tile_size
  example = torch.zeros(2, 3, t, t)
  with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; WSInfer needs it
    warnings.simplefilter('ignore')
    with torch.no_grad():
      traced = torch.jit.trace(torch_module(run_model), example)
    torch.jit.save(traced, path)


def wsinfer_config(run_model) -> Dict[str, Any]:
  """WSInfer's model config (wsinfer-zoo schema, spec_version 1.0)."""
  mean, std = standardisation(run_model)
  t = run_model.tile_size
  return {
      'spec_version': '1.0',
      'architecture': architecture(run_model),
      'num_classes': len(run_model.class_names),
      'class_names': list(run_model.class_names),
      'patch_size_pixels': t,
      'spacing_um_px': model_mpp(run_model),
      'transform': [
          # PIL's BOX filter (torchvision takes PIL's 4): the area average the student's view
          # pools with; WSInfer reads level 0 and resizes, and its default, bilinear, is not
          # what the model saw. QuPath's extension reads only `size`.
          {'name': 'Resize', 'arguments': {'size': t, 'interpolation': PIL_BOX}},
          {'name': 'ToTensor'},
          {'name': 'Normalize', 'arguments': {'mean': list(mean), 'std': list(std)}},
      ],
  }


def torchscript_probabilities(path: str, config: Dict[str, Any], tiles: np.ndarray) -> np.ndarray:
  """Probabilities as WSInfer computes them: the config's ToTensor + Normalize (Resize to the
  tile's own size is the identity), the TorchScript logits, softmax."""
  import torch  # pylint: disable=g-import-not-at-top
  norm = next(s['arguments'] for s in config['transform'] if s['name'] == 'Normalize')
  mean = torch.tensor(norm['mean']).reshape(1, 3, 1, 1)
  std = torch.tensor(norm['std']).reshape(1, 3, 1, 1)
  x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    module = torch.jit.load(path, map_location='cpu')
  with torch.no_grad():
    return torch.softmax(module((x - mean) / std), dim=1).numpy()
