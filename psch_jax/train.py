"""PSCH training and evaluation, top to bottom.

Sections: mesh, input, model and optimizer, run setup, update step, checkpoint,
loop, evaluation. `train_and_evaluate(config, workdir)` is the whole job; `main.py`
only parses flags and calls it. The method lives elsewhere: the network in
`models`, the shared encoder in `encoding`, the pseudo labels and the target matrix
in `targets`, the loss in `loss`.

Data parallelism: one `jax.jit` over a 1-D device mesh spanning every device of every
host, made once per run (`setup_run`) and passed down. The global batch is sharded on
the mesh's "data" axis, params and optimizer state are replicated, and XLA inserts
the gradient all-reduce. The pairwise loss is computed over the whole global batch
(Eq. 8), exactly as on one device.

Reproducibility: every random draw derives from `config.seed` by `fold_in` of a fixed
purpose tag and the step or epoch, the epoch order is a pure function of (seed,
epoch), and the checkpoint holds everything else, so a resumed run replays the same
batches with the same keys and ends with the same codes.

Public API for the other modules: `make_mesh`, `load_data`, `build_model`,
`init_params`, `build_optimizer`, `fresh_state`, `setup_run` / `Run`,
`close_run`, `epoch_targets`, `make_train_step`, `restore_checkpoint`, `MetricsLog`,
`train_and_evaluate`; `make_encoder` and `encode_images` are `psch_jax.encoding`'s.
"""
import os
import sys
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psch_jax import checkpointing
from psch_jax import config_schema
from psch_jax import encoding
from psch_jax import io_utils
from psch_jax import models
from psch_jax import pretrained
from psch_jax import targets as targets_lib
from psch_jax import workdir as workdir_lib
from psch_jax.attention import GroupedAttention
from psch_jax.data import pipeline
from psch_jax.data import sources
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError
from psch_jax.evaluators import retrieval
from psch_jax.loss import psch_loss
from psch_jax.preprocess import augment, preprocess

# Purpose tags for fold_in: one independent key stream per use of randomness.
_INIT, _STEP, _KMEANS = 0, 1, 2


# ----------------------------------------------------------------------------- mesh

def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh named "data" over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


# ---------------------------------------------------------------------------- input

def load_data(config: ml_collections.ConfigDict, workdir: str):
  """The image source and the protocol's index sets (made once, saved in workdir)."""
  if config.data.name in ("nus_wide", "mirflickr25k") and config.data.manual_dir:
    # Our own builders prepare the tfds copy from the user's files on first use:
    # one process writes it, the others wait and then read it.
    if jax.process_index() == 0:
      sources.prepare_manual_dataset(config.data.name, manual_dir=config.data.manual_dir,
                                     data_dir=config.data.data_dir)
    multihost_utils.sync_global_devices("psch_jax: dataset prepared")
  source = sources.load_source(config.data.name, data_dir=config.data.data_dir,
                               manual_dir=config.data.manual_dir)
  split_dir = io_utils.join(workdir, "splits")
  # A run killed between two split files left some of them: draw them again (they
  # are a function of the seed), instead of failing on the missing one.
  if all(io_utils.exists(io_utils.join(split_dir, f"{name}.npy"))
         for name in splits_lib.SPLIT_NAMES):
    return source, splits_lib.load_splits(split_dir, num_examples=len(source))
  overrides = {k: config.data[k] for k in
               ("query_per_class", "train_per_class", "num_validation")
               if config.data[k] is not None}
  index_sets = splits_lib.make_splits(
      source.labels, source.official_split, dataset=config.data.name,
      preset=config.data.preset, seed=config.seed,
      allow_fewer=config.data.allow_fewer, **overrides)
  if config.data.num_database is not None:
    # Keep train and validation (the protocol puts them in the database) and fill
    # up with a seeded draw from the rest.
    kept = np.union1d(index_sets["train"], index_sets["validation"])
    rest = np.setdiff1d(index_sets["database"], kept)
    extra = max(config.data.num_database - len(kept), 0)
    rng = np.random.default_rng([config.seed, len(source)])
    index_sets["database"] = np.union1d(
        kept, rng.choice(rest, min(extra, len(rest)), replace=False))
  if jax.process_index() == 0:
    splits_lib.save_splits(index_sets, split_dir)
  return source, index_sets


# ------------------------------------------------------------- model and optimizer

def build_model(config: ml_collections.ConfigDict) -> models.PSCHNet:
  backbone_kwargs = {}
  if config.model.backbone == "vgg16":
    backbone_kwargs["dropout_rate"] = config.model.dropout_rate
  # .get: a work directory written before the field existed was float32 (search).
  dtype = models.compute_dtype(config.model.get("compute_dtype", "float32"))
  return models.create_model(config.model.backbone, num_bits=config.model.num_bits,
                             num_classes=num_classifier_outputs(config),
                             dtype=dtype, **backbone_kwargs)


def num_classifier_outputs(config: ml_collections.ConfigDict) -> int:
  """K_c, or K_c + K_f with fine clusters: one linear layer holds both classifiers
  of Eq. 9b, the first K_c logits the pseudo classes', the rest the fine clusters'."""
  p = config.pseudo_labels
  return p.num_clusters + (p.fine_clusters or 0)


def init_params(config: ml_collections.ConfigDict, model: models.PSCHNet,
                pretrained_backbone: Optional[Any] = None) -> Any:
  """Random params from the seed, with the backbone's replaced by
  `pretrained_backbone` (from `pretrained.load_vgg16_torchvision`) when given."""
  key = jax.random.fold_in(jax.random.key(config.seed), _INIT)
  shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
  # One compiled program instead of one per initializer op: eager init compiles
  # dozens of tiny programs, which dominates the start-up of small runs. It runs
  # once, so it is compiled without backend optimisation: on CPU XLA otherwise spends
  # far longer optimising the unrolled threefry kernels of the random initialisers
  # than the program runs (docs/benchmarks.md). Still deterministic for the seed.
  init = jax.jit(lambda k: model.init(k, jnp.zeros(shape, jnp.float32),
                                      train=False)["params"])
  if isinstance(key, jax.core.Tracer):
    # Under a transformation (jax.eval_shape of the state before a restore) nothing
    # is compiled, and a compiled program cannot take a tracer.
    params = init(key)
  else:
    params = init.lower(key).compile(
        compiler_options={"xla_backend_optimization_level": 0})(key)
  if pretrained_backbone is not None:
    params = pretrained.replace_backbone_params(params, pretrained_backbone)
  return params


def build_optimizer(config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """Clip, then Adam(W) or SGD with momentum under warmup + cosine, with the
  backbone's learning rate scaled by `optim.backbone_lr_multiplier`."""
  o = config.optim
  total_steps = config.train.num_epochs * steps_per_epoch
  warmup = min(o.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))

  def make(peak_lr):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1))
    if o.name == "adam":
      return optax.adamw(schedule, weight_decay=o.weight_decay)
    return optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.sgd(schedule, momentum=o.momentum, nesterov=True))

  groups = {"backbone": make(o.learning_rate * o.backbone_lr_multiplier),
            "head": make(o.learning_rate)}
  label_fn = lambda params: {k: ("backbone" if k == "backbone" else "head")
                             for k in params}
  return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm),
                     optax.multi_transform(groups, label_fn))


def fresh_state(config: ml_collections.ConfigDict, model: models.PSCHNet,
                tx: optax.GradientTransformation,
                pretrained_backbone: Optional[Any] = None) -> dict:
  """The train state before step 0: {"params", "opt_state", "step": int32 ()}."""
  params = init_params(config, model, pretrained_backbone)
  return {"params": params, "opt_state": jax.jit(tx.init)(params),
          "step": jnp.zeros((), jnp.int32)}


def check_model(config: ml_collections.ConfigDict, model: models.PSCHNet,
                attention: GroupedAttention) -> Optional[dict]:
  """Fails on a model the config cannot build, before anything is allocated or written.

  Returns the VGG-16 backbone params (numpy) of `model.pretrained` / `_path`.

  Traces the network and the part attention on abstract images (`jax.eval_shape`: no
  parameter is allocated, not even VGG-16's 138M), which raises the UserError of an
  `attention.num_parts` that does not divide the feature channels or of images too
  small for the backbone; then fetches (once) and checks the pretrained weights.
  """
  shape = (1, config.model.image_size, config.model.image_size, config.model.channels)

  def forward(key):
    out, _ = model.init_with_output(key, jnp.zeros(shape, jnp.float32), train=False)
    return attention.apply({}, out["feature_map"])

  jax.eval_shape(forward, jax.random.key(0))
  if config.model.pretrained_path:
    if config.model.backbone != "vgg16":
      raise UserError(
          f"config.model.pretrained_path is set but the backbone is "
          f"{config.model.backbone!r}; pretrained weights exist for 'vgg16' only. "
          "Set --config.model.backbone=vgg16 or drop the path.")
  if config.model.backbone == "vgg16":
    return pretrained.resolve_vgg16_weights(config.model.pretrained,
                                            config.model.pretrained_path)
  return None


# ------------------------------------------------------------------------ run setup

class Run(NamedTuple):
  """What training, evaluation and the diagnostics share: built once per run from the
  config by `setup_run`.

  Attributes:
    mesh: the run's one device mesh ("data" axis over every device of every host).
    workdir: absolute work directory.
    source: the image source (`psch_jax.data.sources`).
    index_sets: {"train", "validation", "query", "database"} sorted int64 indices.
    steps_per_epoch: training steps per epoch (the last partial batch is dropped).
    model: the network; attention: its grouped attention (`encoding.make_attention`).
    tx: the optimizer.
    encode: `encoding.make_encoder` of model and attention on the mesh.
    mngr: the Orbax checkpoint manager of workdir/checkpoints
      (close it with `checkpointing.close`).
    pretrained_backbone: numpy params of the pretrained backbone, or None.
    lock: the run's hold on the work directory (`workdir.claim`); `close_run`
      releases it with the checkpoint manager.
  """
  mesh: Mesh
  workdir: str
  source: Any
  index_sets: dict
  steps_per_epoch: int
  model: models.PSCHNet
  attention: GroupedAttention
  tx: optax.GradientTransformation
  encode: Any
  mngr: Any
  pretrained_backbone: Optional[dict]
  lock: Any


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks the config against the devices and the model, claims the work directory,
  then builds the run (mesh, data and splits, model, optimizer, encoder, checkpoint
  manager). Close it with `close_run`.

  The order makes a refused run leave the work directory as it was: the config and
  the model are checked before the work directory is touched; `workdir.claim` then
  checks its layout, locks it (a second run on it is refused, naming the holder) and
  compares the config with its config.json (a changed field that the data, splits,
  schedule or model depend on is refused); config.json is written before the splits,
  so a run killed after drawing them is compared on its rerun too; the sizes of the
  drawn splits are checked before a checkpoint can be written.

  Raises:
    UserError: the config does not fit (devices, model, data), the work directory is
      not writable, has a wrong layout, is in use or holds a run of another config.
  """
  mesh = make_mesh()
  config_schema.check_config(config, num_devices=mesh.size)
  model = build_model(config)
  attention = encoding.make_attention(config)
  pretrained_backbone = check_model(config, model, attention)
  # Local: absolute (a later chdir cannot move it); gs://: kept as it is.
  workdir = os.fspath(io_utils.workdir_path(workdir))
  lock = workdir_lib.claim(workdir, config, process_index=jax.process_index())
  try:
    io_utils.check_writable(workdir, probe_name=f".write-test-{jax.process_index()}")
    if jax.process_index() == 0:
      # For tools that rebuild the model from the work directory alone (search), and
      # for the comparison of the next run on this work directory.
      io_utils.write_json(io_utils.join(workdir, "config.json"), config.to_dict())
    source, index_sets = load_data(config, workdir)
    config_schema.check_against_data(
        config, num_train=len(index_sets["train"]),
        num_database=len(index_sets["database"]), num_query=len(index_sets["query"]),
        num_validation=len(index_sets["validation"]),
        image_channels=source.image_shape[-1])
    steps_per_epoch = len(index_sets["train"]) // config.train.global_batch_size
    tx = build_optimizer(config, steps_per_epoch)
    return Run(mesh=mesh, workdir=workdir, source=source, index_sets=index_sets,
               steps_per_epoch=steps_per_epoch, model=model, attention=attention,
               tx=tx, encode=encoding.make_encoder(config, model, mesh,
                                                   attention=attention),
               mngr=checkpointing.manager(workdir,
                                          keep=config.train.keep_checkpoints),
               pretrained_backbone=pretrained_backbone, lock=lock)
  except BaseException:
    lock.release()
    raise


def close_run(run: Run) -> None:
  """Waits for the checkpoint save in flight, closes the manager, releases the lock."""
  try:
    checkpointing.close(run.mngr)
  finally:
    run.lock.release()


def epoch_targets(config: ml_collections.ConfigDict, run: Run, params, *, epoch: int,
                  previous: Optional[dict] = None) -> tuple[dict, dict]:
  """The training set's targets (`targets.compute_targets`) at the start of `epoch`,
  as training computes them: at epoch 0 from `pseudo_labels.features` of the fresh
  network (`params`), at a refresh from the global features of `params` keeping the
  similarity source of `previous`. Numpy arrays on the host."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _KMEANS),
                           epoch)
  features = config.pseudo_labels.features if previous is None else "global"
  return targets_lib.compute_targets(
      config, key, run.encode, params, run.source, run.index_sets["train"],
      mesh=run.mesh, epoch=epoch, features=features, similarity_from=previous)


# ---------------------------------------------------------------------- update step

def make_train_step(config: ml_collections.ConfigDict, model: models.PSCHNet,
                    tx: optax.GradientTransformation, mesh: Mesh, *,
                    attention: Optional[GroupedAttention] = None):
  """jit: (state, batch, targets) -> (state, metrics); state is donated.

  Args:
    batch: {"images": uint8 (B, H, W, C), "position": int32 (B,) rows of the batch's
      images in the training set}, sharded on the mesh's "data" axis.
    targets: the training set's targets (`targets.compute_targets`), replicated.
    attention: the run's `encoding.make_attention(config)` (the "online" similarity
      source reads it); built from the config when None.
  """
  attention = encoding.make_attention(config) if attention is None else attention
  step_root = jax.random.fold_in(jax.random.key(config.seed), _STEP)
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = NamedSharding(mesh, PartitionSpec("data"))

  def train_step(state, batch, targets):
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_root, state["step"]))
    images = preprocess(batch["images"], image_size=config.model.image_size,
                        channels=config.model.channels, mean=config.data.mean,
                        std=config.data.std)
    images = augment(aug_key, images, kind=config.data.augment)
    position = batch["position"]

    def loss_fn(params):
      out = model.apply({"params": params}, images, train=True,
                        rngs={"dropout": dropout_key})
      online_parts = lambda: attention.apply(
          {}, jax.lax.stop_gradient(out["feature_map"]))[:2]
      batch_target = targets_lib.batch_targets(config, targets, position,
                                               online_parts=online_parts)
      logits, fine_logits = out["class_logits"], None
      if batch_target.fine_labels is not None:
        num_coarse = config.pseudo_labels.num_clusters
        logits, fine_logits = logits[:, :num_coarse], logits[:, num_coarse:]
      return psch_loss(out["relaxed_codes"], logits, batch_target.pseudo_labels, batch_target.target,
                       batch_target.pair_weight, alpha=config.loss.alpha,
                       beta=config.loss.beta, fine_logits=fine_logits,
                       fine_labels=batch_target.fine_labels,
                       fine_alpha=config.loss.fine_alpha)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    labels = targets["pseudo_labels"][position]
    metrics = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()},
               "grad_norm": optax.tree.norm(grads),
               "labelled_fraction": jnp.mean(labels >= 0)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated))


# ----------------------------------------------------------------------- checkpoint

def restore_checkpoint(config: ml_collections.ConfigDict, run: Run
                       ) -> Optional[tuple[dict, dict, dict]]:
  """(state, targets, meta) of the latest checkpoint, replicated on the run's mesh, or
  None without one. Raises the UserError of `checkpointing.restore_latest`."""
  if run.mngr.latest_step() is None:
    return None
  replicated = NamedSharding(run.mesh, PartitionSpec())
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: fresh_state(config, run.model, run.tx)))
  abstract_targets = targets_lib.abstract_targets(
      config, len(run.index_sets["train"]), run.model, replicated,
      pixel_dim=int(np.prod(run.source.image_shape)), attention=run.attention)
  return checkpointing.restore_latest(run.mngr, abstract_state=abstract_state,
                                      abstract_targets=abstract_targets, config=config)


def _checkpoint_meta(config: ml_collections.ConfigDict, step: int,
                     steps_per_epoch: int) -> dict:
  return {"epoch": step // steps_per_epoch,
          "signature": checkpointing.shape_signature(config)}


# ----------------------------------------------------------------------------- loop

class MetricsLog:
  """metrics.jsonl in the work directory (process 0), plus TensorBoard on request.

  Read it back with `io_utils.read_jsonl`, which skips a last line torn by a kill; a
  resumed run replays the steps after its checkpoint, so keep the last record of a
  step.
  """

  def __init__(self, workdir: str, tensorboard: bool):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._writer = None
    if self._active and tensorboard:
      import tensorflow as tf  # seconds to import: only on request
      self._tf = tf
      self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, record: dict) -> None:
    """Appends {"step": step, **record} as one JSON line; scalars to TensorBoard."""
    if not self._active:
      return
    # One write of the whole line, after cutting off a line torn by a kill: a torn
    # record is never read (io_utils.read_jsonl) nor runs into the next one.
    io_utils.append_jsonl(self._path, {"step": step, **record})
    if self._writer is not None:
      with self._writer.as_default(step=step):
        for k, v in record.items():
          if isinstance(v, (int, float)):
            self._tf.summary.scalar(k, v)
      self._writer.flush()


class Progress:
  """The progress of one epoch, drawn to suit where stderr goes (process 0 only).

  On a terminal: a live tqdm bar with the loss terms and images/s. Into a file or a
  pipe (a log): no redraws, one line when the epoch ends and one at most every
  `line_every_s` seconds before, so a log grows by a few lines per epoch.
  """

  def __init__(self, *, total: int, initial: int, epoch: int, num_epochs: int,
               stream=None, line_every_s: float = 60.0):
    self._stream = sys.stderr if stream is None else stream
    self._active = jax.process_index() == 0
    self._live = self._active and self._stream.isatty()
    self._total, self._done = total, initial
    self._desc = f"epoch {epoch + 1}/{num_epochs}"
    self._line_every_s = line_every_s
    self._last_line = time.perf_counter()
    self._postfix = ""
    self._bar = None
    if self._live:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=self._desc, unit="step",
                       dynamic_ncols=True, leave=True, file=self._stream)

  def update(self, metrics: dict, images_per_s: float, steps: int = 1) -> None:
    """`steps` more steps done (those since the last log point); `metrics` are the
    host floats of the newest."""
    if not self._active:
      return
    self._done += steps
    fields = {"loss": f"{metrics['loss']:.4f}", "sim": f"{metrics['loss_sim']:.4f}",
              "cls": f"{metrics['loss_cls']:.3f}", "q": f"{metrics['loss_quant']:.3f}",
              "img_s": f"{images_per_s:.0f}"}
    if self._bar is not None:
      self._bar.set_postfix(refresh=False, **fields)
      self._bar.update(steps)
      return
    self._postfix = ", ".join(f"{k}={v}" for k, v in fields.items())
    now = time.perf_counter()
    if self._done < self._total and now - self._last_line >= self._line_every_s:
      self._line()
      self._last_line = now

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._active and self._postfix:
      self._line()

  def _line(self) -> None:
    print(f"{self._desc}: step {self._done}/{self._total}, {self._postfix}",
          file=self._stream, flush=True)


_NON_FINITE_FIX = (
    "training stopped. Lower optim.learning_rate or check the input normalisation "
    "(data.mean / data.std), and start in a new --workdir.")

# Steps dispatched beyond the newest one known to be finished: enough to keep the
# device busy while the host prepares the next batch, few enough that the queued
# input batches do not pile up in device memory between two log points.
_STEPS_IN_FLIGHT = 2


def _check_finite(window: list[dict], first_step: int) -> None:
  """Raises FloatingPointError naming the window's steps, the first step with a
  non-finite loss term or gradient norm, and those terms.

  Args:
    window: host metrics (name -> float) of steps first_step, first_step + 1, ...
      (a step's number is the state's step count after it).
  """
  # grad_norm too: a non-finite gradient turns the params into NaN through the update,
  # and that state must never reach a checkpoint.
  for offset, metrics in enumerate(window):
    bad = [k for k, v in metrics.items()
           if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(v)]
    if bad:
      last = first_step + len(window) - 1
      raise FloatingPointError(
          f"non-finite {', '.join(sorted(bad))} within steps [{first_step}, {last}], "
          f"first at step {first_step + offset}: {_NON_FINITE_FIX}")


@jax.jit
def _is_finite(tree) -> jax.Array:
  """bool (): every floating-point leaf of `tree` is finite (on the device)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _read_metrics(pending: list[dict], first_step: int,
                  state: Optional[dict] = None) -> list[dict]:
  """The training loop's one device-to-host transfer: the metrics of the steps since
  the last read, checked for non-finite values; with `state` (before a save) also
  whether every value of the state is finite, so a diverged state is never saved.

  Args:
    pending: device metrics (name -> f32 scalar) of steps first_step, first_step + 1,
      ..., oldest first.
  Returns:
    Their host floats, one dict per step. Raises FloatingPointError on a non-finite one.
  """
  finite = None if state is None else _is_finite(state)
  # Allowed here even under a guard that disallows transfers around the loop (as the
  # test of the loop runs it): this is the read the loop means to do.
  with jax.transfer_guard_device_to_host("allow"):
    host, finite = jax.device_get((pending, finite))
  window = [{k: float(v) for k, v in metrics.items()} for metrics in host]
  _check_finite(window, first_step)
  if finite is not None and not finite:
    raise FloatingPointError(
        f"non-finite parameters or optimizer state after step "
        f"{first_step + len(window) - 1} (the metrics of steps [{first_step}, "
        f"{first_step + len(window) - 1}] are finite); it was not saved: "
        f"{_NON_FINITE_FIX}")
  return window


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains PSCH as `config` says, evaluates retrieval, and returns the results.

  Writes into `workdir`: splits/, checkpoints/, metrics.jsonl and results.json.
  Resumes from the latest checkpoint when there is one.
  """
  run = setup_run(config, workdir)
  try:
    return _train_and_evaluate(config, run)
  except FloatingPointError as e:
    # Say what is on disk only once the save in flight has completed.
    run.mngr.wait_until_finished()
    step = run.mngr.latest_step()
    kept = (f"The last good checkpoint (step {step}) is kept; it may already be "
            "diverging." if step is not None else
            "No checkpoint was saved before it.")
    raise FloatingPointError(f"{e} {kept}") from None
  finally:
    # On an error (a non-finite loss, a full disk, Ctrl-C) an asynchronous save may
    # still be writing: close() waits for it, so the newest checkpoint is complete
    # rather than a *.orbax-checkpoint-tmp directory the next run deletes.
    close_run(run)


def _train_and_evaluate(config: ml_collections.ConfigDict, run: Run) -> dict:
  mesh, source, mngr = run.mesh, run.source, run.mngr
  train_indices = run.index_sets["train"]
  steps_per_epoch = run.steps_per_epoch
  replicated = NamedSharding(mesh, PartitionSpec())
  train_step = make_train_step(config, run.model, run.tx, mesh, attention=run.attention)
  log = MetricsLog(run.workdir, config.train.tensorboard)
  evaluators = retrieval.from_config(config, encode=run.encode, source=source,
                                     index_sets=run.index_sets, mesh=mesh)

  restored = restore_checkpoint(config, run)
  if restored is None:
    state = jax.device_put(
        fresh_state(config, run.model, run.tx, run.pretrained_backbone), replicated)
    targets, stats = epoch_targets(config, run, state["params"], epoch=0)
    targets = jax.device_put(targets, replicated)
    log.write(0, {"pseudo_labels": stats})
    _info(f"pseudo labels: kept {stats['kept_fraction']:.3f}, purity "
          f"{stats['purity']:.3f} (diagnostic only)")
  else:
    state, targets, meta = restored
    _info(f"resumed from step {int(state['step'])} (epoch {meta['epoch']})")

  def save(step: int, state):
    run.lock.check()  # on gs://: stop before writing if another run took the lease
    checkpointing.save(mngr, step, state=state, targets=targets,
                       meta=_checkpoint_meta(config, step, steps_per_epoch))

  num_epochs = config.train.num_epochs
  step = int(state["step"])
  refresh = config.pseudo_labels.refresh_every_epochs
  while step < num_epochs * steps_per_epoch:
    epoch, start = divmod(step, steps_per_epoch)
    if start == 0 and epoch > 0 and refresh and epoch % refresh == 0:
      targets, stats = epoch_targets(config, run, state["params"], epoch=epoch,
                                     previous=targets)
      targets = jax.device_put(targets, replicated)
      log.write(step, {"pseudo_labels": stats})
    batches = pipeline.train_batches(
        source, train_indices, seed=config.seed, epoch=epoch,
        global_batch_size=config.train.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start)
    state, step = run_epoch(config, train_step, state, targets, batches,
                             train_indices, mesh=mesh, step=step, epoch=epoch,
                             steps_per_epoch=steps_per_epoch, log=log, save=save)
    every = config.eval.validation_every_epochs
    if every and (epoch + 1) % every == 0:
      log.write(step, evaluators["validation"].run(state["params"])[0])
  mngr.wait_until_finished()

  # Evaluation: psch_jax/evaluators/retrieval.py.
  metrics, codes = evaluators["test"].run(state["params"])
  results = retrieval.results_record(config, run.index_sets, metrics)
  results.update({"epochs": num_epochs, "steps": step, "selection": "last epoch"})
  results.update(evaluators["validation"].run(
      state["params"], codes_at_hand=(run.index_sets["database"], codes["database"]))[0])
  retrieval.write_results(run.workdir, results, codes, source, run.index_sets)
  log.write(step, {"results": {k: v for k, v in results.items()
                               if isinstance(v, (int, float))}})
  return results


def run_epoch(config, train_step, state, targets, batches, train_indices, *,
               mesh, step, epoch, steps_per_epoch, log, save):
  """Runs the rest of one epoch from `step` over `batches` (this host's rows of
  `pipeline.train_batches`); returns (state, step) at its end.

  The host does not wait for the device between log points: each step is dispatched
  and its metrics stay on the device (at most `_STEPS_IN_FLIGHT` steps ahead of the
  newest finished one) until `_read_metrics` reads those of every step since the last
  read in one transfer: every `train.log_every_steps` steps, before every save and at
  the epoch end. There a non-finite loss term stops the run, naming the steps, and
  before a save a non-finite state does too, so it is never saved. The progress
  display updates at those reads; the epoch's means written to `log` are those of
  every step, summed in step order as floats (the same numbers whatever
  `log_every_steps` is).

  `save(step, state)` is called at the epoch end and every
  `train.checkpoint_every_steps` steps.
  """
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  start = step % steps_per_epoch
  progress = Progress(total=steps_per_epoch, initial=start, epoch=epoch,
                      num_epochs=config.train.num_epochs)
  batch_size = config.train.global_batch_size
  wait = compute = 0.0
  sums, count = {}, 0
  pending = []  # Device metrics of the steps since the last read, oldest first.

  def read(state_to_save=None) -> list[dict]:
    nonlocal pending, count
    window = _read_metrics(pending, step - len(pending) + 1, state=state_to_save)
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
    state, metrics = train_step(state, encoding.global_batch(local, sharding), targets)
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
# Encoding, ranking and scoring live in psch_jax/evaluators/retrieval.py.

def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir` without training."""
  run = setup_run(config, workdir)
  try:
    restored = restore_checkpoint(config, run)
    if restored is None:
      raise UserError(f"no checkpoint in {run.workdir}/checkpoints to evaluate; train "
                      "first (--mode=train) or pass the --workdir of a trained run.")
    state, _, meta = restored
    test = retrieval.from_config(config, encode=run.encode, source=run.source,
                                 index_sets=run.index_sets, mesh=run.mesh)["test"]
    metrics, codes = test.run(state["params"])
    results = retrieval.results_record(config, run.index_sets, metrics)
    results.update({"steps": int(state["step"]), "epochs": meta["epoch"],
                    "selection": "latest checkpoint"})
    retrieval.write_results(run.workdir, results, codes, run.source, run.index_sets)
  finally:
    close_run(run)
  return results
