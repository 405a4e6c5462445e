"""Training, top to bottom: the update step, the epoch, the whole job.

`train_and_evaluate(config, workdir)` is the whole job; `evaluate_checkpoint` scores
the latest checkpoint without training. What a run is built from (mesh, data, model,
weights, optimizer, checkpoint manager) is `run_setup`'s; what the loop logs and
guards is `monitoring`'s; what differs between methods (PSCH and its deep peers:
views, targets, loss) is `methods`'; evaluation is `evaluators/retrieval`.

Data parallelism: one `jax.jit` over the run's 1-D device mesh (`sharding`). The
global batch is split over the mesh, params and optimizer state are replicated, and
XLA inserts the gradient all-reduce. Every loss is computed over the whole global
batch (PSCH's pairs of Eq. 8, BiHalf's per-bit median), exactly as on one device.

Reproducibility: every random draw derives from `config.seed` by `fold_in` of a fixed
purpose tag (`run_setup.KEY_*`) and the step or epoch, the epoch order is a pure
function of (seed, epoch), and the checkpoint holds everything else, so a resumed run
replays the same batches with the same keys and ends with the same codes.
"""
import time
from typing import Callable, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from psch_jax import checkpointing
from psch_jax import encoding
from psch_jax import io_utils
from psch_jax import methods
from psch_jax import models
from psch_jax import monitoring
from psch_jax import run_setup
from psch_jax import sharding
from psch_jax import workdir as workdir_lib
from psch_jax.attention import GroupedAttention
from psch_jax.data import pipeline
from psch_jax.evaluators import retrieval
from psch_jax.preprocess import augment, preprocess

# Steps dispatched beyond the newest one known to be finished: enough to keep the
# device busy while the host prepares the next batch, few enough that the queued
# input batches do not pile up in device memory between two log points.
_STEPS_IN_FLIGHT = 2


def epoch_targets(config: ml_collections.ConfigDict, run: run_setup.Run, params, *,
                  epoch: int, previous: Optional[dict] = None) -> tuple[dict, dict]:
  """The method's targets of the training set at the start of `epoch`
  (`methods.Method.epoch_targets`; PSCH: `targets.compute_targets`), made from
  `params` (the fresh network at epoch 0), keeping what the method keeps of
  `previous` at a refresh. Numpy arrays on the host, and their statistics."""
  key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(config.seed), run_setup.KEY_KMEANS), epoch)
  data = methods.TrainingData(encode=run.encode, source=run.source,
                              train_indices=run.index_sets["train"], mesh=run.mesh)
  return methods.for_config(config).epoch_targets(config, key, data, params,
                                                  epoch=epoch, previous=previous)


# ---------------------------------------------------------------------- update step

def make_train_step(config: ml_collections.ConfigDict, model: models.PSCHNet,
                    tx: optax.GradientTransformation, mesh: Mesh, *,
                    attention: Optional[GroupedAttention] = None):
  """jit: (state, batch, targets) -> (state, metrics); state is donated.

  One step of the config's method (`methods.for_config`): each of its views of the
  batch is preprocessed and augmented on the device, run through the network, and
  the method's loss of those outputs is minimised.

  Args:
    batch: {"images": uint8 (B, H, W, C), "position": int32 (B,) rows of the batch's
      images in the training set}, split over the mesh (`sharding.batch_sharding`).
    targets: the training set's targets (`epoch_targets`), replicated.
    attention: the run's `encoding.make_attention(config)` (PSCH's "online"
      similarity source reads it); built from the config when None.
  """
  method = methods.for_config(config)
  attention = encoding.make_attention(config) if attention is None else attention
  seed_key = jax.random.key(config.seed)
  step_root = jax.random.fold_in(seed_key, run_setup.KEY_STEP)
  method_root = jax.random.fold_in(seed_key, run_setup.KEY_METHOD)
  augmentation = method.view_augmentation(config)
  replicated = sharding.replicated(mesh)
  sharded = sharding.batch_sharding(mesh)

  def train_step(state, batch, targets):
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_root, state["step"]))
    method_key = jax.random.fold_in(method_root, state["step"])
    images = preprocess(batch["images"], image_size=config.model.image_size,
                        channels=config.model.channels, mean=config.data.mean,
                        std=config.data.std)
    if method.num_views == 1:
      aug_keys, dropout_keys = [aug_key], [dropout_key]
    else:
      aug_keys = jax.random.split(aug_key, method.num_views)
      dropout_keys = jax.random.split(dropout_key, method.num_views)
    views = [augment(k, images, kind=augmentation, mean=config.data.mean,
                     std=config.data.std) for k in aug_keys]

    def loss_fn(params):
      outputs = [model.apply({"params": params}, view, train=True,
                             rngs={"dropout": k})
                 for view, k in zip(views, dropout_keys)]
      return method.loss(config, outputs, targets, batch["position"], key=method_key,
                         attention=attention)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated))


# ----------------------------------------------------------------------- checkpoint

def restore_checkpoint(config: ml_collections.ConfigDict, run: run_setup.Run
                       ) -> Optional[tuple[dict, dict, dict]]:
  """(state, targets, meta) of the latest checkpoint, replicated on the run's mesh, or
  None without one. Raises the UserError of `checkpointing.restore_latest`."""
  if run.mngr.latest_step() is None:
    return None
  replicated = sharding.replicated(run.mesh)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: run_setup.fresh_state(config, run.model, run.tx)))
  abstract_targets = methods.for_config(config).abstract_targets(
      config, len(run.index_sets["train"]), run.model, replicated,
      pixel_dim=int(np.prod(run.source.image_shape)), attention=run.attention)
  return checkpointing.restore_latest(run.mngr, abstract_state=abstract_state,
                                      abstract_targets=abstract_targets, config=config,
                                      verified_step=run.verified_step)


def _checkpoint_meta(config: ml_collections.ConfigDict, step: int,
                     steps_per_epoch: int) -> dict:
  return {"epoch": step // steps_per_epoch,
          "signature": checkpointing.shape_signature(config)}


# ----------------------------------------------------------------------------- loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the config's method as `config` says, evaluates retrieval, and returns the results.

  Writes into `workdir`: splits/, checkpoints/, metrics.jsonl and results.json.
  Resumes from the latest checkpoint when there is one.
  """
  run = run_setup.setup_run(config, workdir)
  try:
    return _train_and_evaluate(config, run)
  except FloatingPointError as e:
    # Say what is on disk only once the save in flight has completed.
    checkpointing.wait(run.mngr)
    step = run.mngr.latest_step()
    kept = (f"The last good checkpoint (step {step}) is kept; it may already be "
            "diverging." if step is not None else
            "No checkpoint was saved before it.")
    raise FloatingPointError(f"{e} {kept}") from None
  finally:
    # On an error (a non-finite loss, a full disk, Ctrl-C) an asynchronous save may
    # still be writing: close() waits for it, so the newest checkpoint is complete
    # rather than a *.orbax-checkpoint-tmp directory the next run deletes.
    run_setup.close_run(run)


def _train_and_evaluate(config: ml_collections.ConfigDict, run: run_setup.Run) -> dict:
  mesh, source, mngr = run.mesh, run.source, run.mngr
  method = methods.for_config(config)
  train_indices = run.index_sets["train"]
  steps_per_epoch = run.steps_per_epoch
  replicated = sharding.replicated(mesh)
  train_step = make_train_step(config, run.model, run.tx, mesh, attention=run.attention)
  log = monitoring.MetricsLog(run.workdir, config.train.tensorboard)
  evaluators = retrieval.from_config(config, encode=run.encode, source=source,
                                     index_sets=run.index_sets, mesh=mesh)

  restored = restore_checkpoint(config, run)
  if restored is None:
    state = jax.device_put(
        run_setup.fresh_state(config, run.model, run.tx, run.pretrained_backbone),
        replicated)
    targets, stats = epoch_targets(config, run, state["params"], epoch=0)
    targets = jax.device_put(targets, replicated)
    log.write(0, {method.log_key: stats})
    _info(method.describe(stats))
  else:
    state, targets, meta = restored
    _info(f"resumed from step {int(state['step'])} (epoch {meta['epoch']})")

  def save(step: int, state):
    run.lock.check()  # on gs://: stop before writing if another run took the lease
    checkpointing.save(mngr, step, state=state, targets=targets,
                       meta=_checkpoint_meta(config, step, steps_per_epoch))

  loop = EpochLoop(train_step=train_step, mesh=mesh, train_indices=train_indices,
                   steps_per_epoch=steps_per_epoch, log=log, save=save)
  num_epochs = config.train.num_epochs
  step = int(state["step"])
  while step < num_epochs * steps_per_epoch:
    epoch, start = divmod(step, steps_per_epoch)
    if start == 0 and method.refresh_due(config, epoch):
      targets, stats = epoch_targets(config, run, state["params"], epoch=epoch,
                                     previous=targets)
      targets = jax.device_put(targets, replicated)
      log.write(step, {method.log_key: stats})
    batches = pipeline.train_batches(
        source, train_indices, seed=config.seed, epoch=epoch,
        global_batch_size=config.train.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start)
    state, step = run_epoch(config, loop, state, targets, batches, step=step)
    every = config.eval.validation_every_epochs
    if every and (epoch + 1) % every == 0:
      log.write(step, evaluators["validation"].run(state["params"])[0])
  checkpointing.wait(mngr)
  results = evaluate(config, run, state, evaluators, epochs=num_epochs,
                     selection="last epoch")
  log.write(step, {"results": {k: v for k, v in results.items()
                               if isinstance(v, (int, float))}})
  return results


def evaluate(config: ml_collections.ConfigDict, run: run_setup.Run, state: dict,
             evaluators: dict, *, epochs: int, selection: str) -> dict:
  """Scores `state`'s params (test: query vs database; validation, from the database
  codes) and writes them as one generation of results (`retrieval.write_results`),
  stamped with the checkpoint step. The same record whether training ends here or
  `--mode=eval` scores the checkpoint later. Returns the stamped results."""
  # Evaluation: psch_jax/evaluators/retrieval.py.
  metrics, codes = evaluators["test"].run(state["params"])
  results = retrieval.results_record(config, run.index_sets, metrics)
  step = int(state["step"])
  results.update({"epochs": epochs, "steps": step, "selection": selection})
  results.update(evaluators["validation"].run(
      state["params"], codes_at_hand=(run.index_sets["database"], codes["database"]))[0])
  return retrieval.write_results(run.workdir, results, codes, run.source,
                                 run.index_sets, config=config.to_dict(), step=step)


class EpochLoop(NamedTuple):
  """What every epoch of a run shares.

  Attributes:
    train_step: `make_train_step`'s jit, (state, batch, targets) -> (state, metrics).
    mesh: the run's mesh; batches are split over it.
    train_indices: sorted global indices of the training set; a batch's "position"
      is its rows in it (where the targets are).
    steps_per_epoch: steps of a full epoch.
    log: where the epoch's record goes (`monitoring.MetricsLog`).
    save: save(step, state), called at the epoch end and every
      `train.checkpoint_every_steps` steps.
  """
  train_step: Callable
  mesh: Mesh
  train_indices: np.ndarray
  steps_per_epoch: int
  log: monitoring.MetricsLog
  save: Callable[[int, dict], None]


def run_epoch(config: ml_collections.ConfigDict, loop: EpochLoop, state: dict,
              targets: dict, batches, *, step: int) -> tuple[dict, int]:
  """Runs the rest of the epoch that `step` is in over `batches` (this host's rows
  of `pipeline.train_batches`); returns (state, step) at its end.

  The host does not wait for the device between log points: each step is dispatched
  and its metrics stay on the device (at most `_STEPS_IN_FLIGHT` steps ahead of the
  newest finished one) until `monitoring.read_metrics` reads those of every step since the last
  read in one transfer: every `train.log_every_steps` steps, before every save and at
  the epoch end. There a non-finite loss term stops the run, naming the steps, and
  before a save a non-finite state does too, so it is never saved. The progress
  display updates at those reads; the epoch's means written to `log` are those of
  every step, summed in step order as floats (the same numbers whatever
  `log_every_steps` is).

  `loop.save(step, state)` is called at the epoch end and every
  `train.checkpoint_every_steps` steps.
  """
  train_step, train_indices, log, save = (loop.train_step, loop.train_indices,
                                          loop.log, loop.save)
  steps_per_epoch = loop.steps_per_epoch
  epoch = step // steps_per_epoch
  batch_sharding = sharding.batch_sharding(loop.mesh)
  start = step % steps_per_epoch
  progress = monitoring.Progress(total=steps_per_epoch, initial=start, epoch=epoch,
                      num_epochs=config.train.num_epochs)
  batch_size = config.train.global_batch_size
  wait = compute = 0.0
  sums, count = {}, 0
  pending = []  # Device metrics of the steps since the last read, oldest first.

  def read(state_to_save=None) -> list[dict]:
    nonlocal pending, count
    window = monitoring.read_metrics(pending, step - len(pending) + 1, state=state_to_save)
    pending = []
    for metrics in window:
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v
    count += len(window)
    return window

  def show(window: list[dict]) -> None:
    progress.update(window[-1], count * batch_size / max(wait + compute, 1e-9),
                    steps=len(window))

  tick = time.perf_counter()
  for local in batches:
    fetched = time.perf_counter()
    wait += fetched - tick
    local = {"images": local["images"],
             "position": np.searchsorted(train_indices, local["index"]).astype(np.int32)}
    state, metrics = train_step(state, sharding.global_batch(local, batch_sharding),
                                 targets)
    step += 1
    pending.append(metrics)
    saving = (step % steps_per_epoch == 0
              or step % config.train.checkpoint_every_steps == 0)
    window = None
    if saving or step % config.train.log_every_steps == 0:
      window = read(state if saving else None)
    elif len(pending) > _STEPS_IN_FLIGHT:
      # Waits for an older step, not this one: the device still has the newer queued.
      jax.block_until_ready(pending[-1 - _STEPS_IN_FLIGHT])
    tick = time.perf_counter()
    compute += tick - fetched
    if window is not None:
      show(window)
    if saving:
      save(step, state)
  if pending:  # The batches ended before the epoch did.
    show(read())
  progress.close()
  record = {k: v / max(count, 1) for k, v in sums.items()}
  record.update({"epoch": epoch + 1, "data_wait_fraction": wait / max(wait + compute, 1e-9),
                 "images_per_s": count * batch_size / max(wait + compute, 1e-9)})
  log.write(step, record)
  return state, step


def _info(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# ----------------------------------------------------------------------- evaluation

def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir` without training: every metric a
  finished run has, the validation ones included, as one new generation of results.

  Reads only until the results are written: a config that differs from config.json
  only in fields that may change (`workdir.RESUME_SAFE`, e.g. eval.topk) is written
  to config.json with them, since the new results are made with it.
  """
  run = run_setup.setup_run(config, workdir, mode=run_setup.EVAL)
  try:
    state, _, meta = restore_checkpoint(config, run)
    evaluators = retrieval.from_config(config, encode=run.encode, source=run.source,
                                       index_sets=run.index_sets, mesh=run.mesh)
    finished = int(state["step"]) >= config.train.num_epochs * run.steps_per_epoch
    if jax.process_index() == 0:
      io_utils.write_json(io_utils.join(run.workdir, workdir_lib.CONFIG_FILE),
                          config.to_dict())
    results = evaluate(config, run, state, evaluators, epochs=meta["epoch"],
                       selection="last epoch" if finished else "latest checkpoint")
  finally:
    run_setup.close_run(run)
  return results
