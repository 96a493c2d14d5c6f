r"""Export a finished run's model for use outside this package: ONNX, and a WSInfer model directory.

  python -m camkd_jax.export --workdir workdirs/attn_kd_m2.5 --format all --out exported/
  python -m camkd_jax.export --workdir RUN --model teacher --format onnx --out teacher_onnx/

The model is read exactly as camkd_jax.inference.load_run_model reads it (class names,
magnification, view, tile size, input standardisation). --out becomes a self-contained folder:

  model_card.md           what the model is (run, classes, magnification, MPP, tile size, view),
                          its validation / test metrics, the preprocessing it bakes in, and the
                          parity measured when it was written
  model.onnx              (onnx, all) tiles -> class probabilities: input `tiles`, uint8 (or
                          float32 in [0, 255] with --onnx_input=float32) of shape
                          (N, t, t, 3), t = the tile size at the model's magnification, N any;
                          outputs `probabilities` (N, C) and `logits` (N, C). Inside: / 255, the
                          student view (align-corners bilinear upsampling by f for an upsampled
                          student), the input standardisation, the VGG, softmax.
  config.json +           (wsinfer, all) a WSInfer model: TorchScript module (N, 3, t, t) float
  torchscript_model.pt    -> logits (WSInfer and QuPath apply softmax), config.json in WSInfer's
                          model-config schema 1.0 (patch size, spacing in um/px, class names,
                          Resize / ToTensor / Normalize transforms).

The pooling of the student view (avg-pool f of the 10x image) is what reading the slide at the
model's magnification does, so every format takes tiles at that magnification, as
camkd_jax.inference.Predictor and camkd_jax.slide do.

Before anything is moved to --out, the exported files are run on the same tiles as the JAX
model (onnxruntime; TorchScript reloaded by torch.jit.load behind the config's transforms) and
refused when a probability differs by more than PARITY_ATOL; the differences go in the card.
The folder is written under a temporary name and renamed: an --out is complete or absent.
Needs `pip install -e ".[onnx]"` for ONNX and `.[export]` (adds torch) for WSInfer; no TensorFlow.

Modules, by job:
  model       file names, limits, errors; what the run model is (pixel size, standardisation,
              view, VGG layout, torchvision state, description)
  onnx_graph  the ONNX graph, built node by node, and onnxruntime's probabilities
  wsinfer     the TorchScript module, WSInfer's config.json, and WSInfer's probabilities
  card        model_card.md
  writer      `export`: the parity check against JAX and the folder, written whole or not at all
  cli         the flags and `main` of `python -m camkd_jax.export` (run by __main__.py)
The names below are the package's public API, so `from camkd_jax import export` reaches them.
"""
from camkd_jax.export.card import model_card
from camkd_jax.export.cli import define_flags, main
from camkd_jax.export.model import (BASE_MPP, CARD_FILE, FORMATS, INSTALL, ONNX_FILE, ONNX_INPUTS,
                                    ONNX_OPSET, PARITY_ATOL, PARITY_TILES, PIL_BOX,
                                    TORCHSCRIPT_FILE, WSINFER_CONFIG, ExportError,
                                    MissingExtraError, architecture, conv_blocks, description,
                                    formats_of, model_mpp, require, standardisation,
                                    torchvision_state, upsampled)
from camkd_jax.export.onnx_graph import onnx_model, onnx_probabilities
from camkd_jax.export.wsinfer import (torch_module, torchscript_probabilities, wsinfer_config,
                                      write_torchscript)
from camkd_jax.export.writer import check_parity, export, jax_probabilities, parity_tiles
