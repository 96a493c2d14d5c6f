"""Orbax checkpoints: the resumable state of a training stage, and exported (finished) models.

Stage checkpoints (`StageCheckpoints`): one orbax step directory holds, atomically,
  state     the train state pytree of distill.create_train_state (params, opt_state, step, rng,
            bad_step, bad_terms),
  best      the parameters of the best epoch so far (by validation metric),
  progress  JSON: epoch history, the best epoch's metrics, the running loss sums of the current
            epoch and the stage's seconds so far (train_wall_time_s).
Keeping the best parameters inside the same step as the latest state means a kill can never leave
"best" and "latest" out of step with each other.

Exported models (`save_model` / `load_model`): a directory with `params/` (orbax) and
`metadata.json` (runs.model_metadata: architecture, input size, class names, metrics). The
metadata file is written last and marks the export as finished; camkd_jax.runs reads and checks
it (read_metadata, check_export, is_finished_model).

All calls are collective (every process calls them); JSON files are written by process 0 only.
"""
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from camkd_jax import errors
from camkd_jax import runs


def abstract_tree(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, the target of a restore."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class StageCheckpoints:
  """Latest-state checkpoints of one training stage in `directory` (orbax CheckpointManager)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    # Synchronous saves: the train state's buffers are donated to the next step, and a finished
    # save is what "the last good checkpoint" promises.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'best', 'progress'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, best_params, progress: Dict[str, Any]):
    """Saves one step (collective). A step already on disk is left as it is."""
    if step in self.manager.all_steps():
      return
    resume = f' (it resumes from step {self.latest_step() or 0})'
    with errors.disk_writes(self.directory, f'the checkpoint of step {step}', resume):
      self.manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best_params),
          progress=ocp.args.JsonSave(runs.jsonable(progress))))
      self.manager.wait_until_finished()

  def restore(self, step: int, state_template, best_template) -> Tuple[Any, Any, Dict]:
    """(state, best_params, progress) of `step`, placed like the templates."""
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_tree(state_template)),
        best=ocp.args.StandardRestore(abstract_tree(best_template)),
        progress=ocp.args.JsonRestore()))
    return out['state'], out['best'], dict(out['progress'])

  def close(self):
    self.manager.close()


def save_model(directory: str, params, metadata: Dict[str, Any]):
  """Exports finished parameters and their metadata (collective)."""
  directory = os.path.abspath(directory)
  with errors.disk_writes(directory, 'the model export'):
    _save_model(directory, params, metadata)


def _save_model(directory: str, params, metadata: Dict[str, Any]):
  path = os.path.join(directory, runs.PARAMS)
  checkpointer = ocp.StandardCheckpointer()
  # A previous export that never got its metadata (killed in between) is replaced. Process 0
  # alone looks and deletes; the barrier is unconditional, or a process that looked after the
  # deletion would skip it and meet the others at a different barrier.
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  sync('camkd_jax_save_model_clear')
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  write_json(os.path.join(directory, runs.METADATA), metadata)


def load_model(directory: str, params_template) -> Tuple[Any, Dict[str, Any]]:
  """(params placed like `params_template`, metadata) of an exported model."""
  metadata = runs.check_export(directory)
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(os.path.join(os.path.abspath(directory), runs.PARAMS),
                                  abstract_tree(params_template))
  except (ValueError, KeyError) as e:
    raise errors.ConfigError(f'parameters in {directory}/{runs.PARAMS} do not fit the configured '
                             f'model: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    # Missing or cut array files: tensorstore / orbax raise their own types.
    first = (str(e).strip().splitlines() or [''])[0].split('. See full')[0][:300]
    raise runs.export_error(directory, f'{runs.PARAMS}/ cannot be read, it is truncated or '
                            f'damaged ({type(e).__name__}: {first})') from e
  finally:
    checkpointer.close()
  return params, metadata


# ----------------------------------------------------------------------------- small file helpers
def sync(name: str):
  """Barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def write_json(path: str, obj, barrier: bool = True):
  """runs.write_json (atomic) by process 0, then a barrier."""
  if jax.process_index() == 0:
    runs.write_json(path, obj)
  if barrier:
    sync('camkd_jax_write_json')
