"""PSCH training and evaluation, top to bottom.

Sections: mesh, input, model and optimizer, encoders, pseudo labels, update step,
checkpoint, loop, evaluation. `train_and_evaluate(config, workdir)` is the whole job;
`main.py` only parses flags and calls it.

Data parallelism: one `jax.jit` over a 1-D device mesh spanning every device of every
host. The global batch is sharded on the mesh's "data" axis, params and optimizer
state are replicated, and XLA inserts the gradient all-reduce. The pairwise loss is
computed over the whole global batch (Eq. 8), exactly as on one device.

Reproducibility: every random draw derives from `config.seed` by `fold_in` of a fixed
purpose tag and the step or epoch, the epoch order is a pure function of (seed,
epoch), and the checkpoint holds everything else, so a resumed run replays the same
batches with the same keys and ends with the same codes.
"""
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psch_jax import checkpointing
from psch_jax import config as psch_config
from psch_jax import evaluation
from psch_jax import io_utils
from psch_jax import models
from psch_jax import pretrained
from psch_jax import reports
from psch_jax import spectral
from psch_jax.attention import GroupedAttention
from psch_jax.data import pipeline
from psch_jax.data import sources
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError
from psch_jax.loss import psch_loss
from psch_jax.preprocess import augment, preprocess
from psch_jax.pseudo_labels import pseudo_labels as make_pseudo_labels
from psch_jax.pseudo_labels import cluster_affinity, purity
from psch_jax.similarity import pixel_similarity, soft_similarity, target_similarity

# Purpose tags for fold_in: one independent key stream per use of randomness.
_INIT, _STEP, _KMEANS = 0, 1, 2


# ----------------------------------------------------------------------------- mesh

def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh named "data" over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def _to_host(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated global array (works on every process)."""
  return np.asarray(x.addressable_data(0))


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
  split_dir = os.path.join(workdir, "splits")
  # A run killed between two split files left some of them: draw them again (they
  # are a function of the seed), instead of failing on the missing one.
  if all(os.path.exists(os.path.join(split_dir, f"{name}.npy"))
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


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This host's rows of a batch -> global arrays sharded on the data axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


# ------------------------------------------------------------- model and optimizer

def build_model(config: ml_collections.ConfigDict) -> models.PSCHNet:
  backbone_kwargs = {}
  if config.model.backbone == "vgg16":
    backbone_kwargs["dropout_rate"] = config.model.dropout_rate
  return models.create_model(config.model.backbone, num_bits=config.model.num_bits,
                             num_classes=config.pseudo_labels.num_clusters,
                             **backbone_kwargs)


def init_params(config: ml_collections.ConfigDict, model: models.PSCHNet,
                pretrained_backbone: Optional[Any] = None) -> Any:
  """Random params from the seed, with the backbone's replaced by
  `pretrained_backbone` (from `pretrained.load_vgg16_torchvision`) when given."""
  key = jax.random.fold_in(jax.random.key(config.seed), _INIT)
  shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
  # One compiled program instead of one per initializer op: eager init compiles
  # dozens of tiny programs, which dominates the start-up of small runs. It runs
  # once, so it is compiled without backend optimisation: on CPU XLA otherwise spends
  # ~8 s optimising the unrolled threefry kernels of the random initialisers for a
  # program that runs in 0.2 s (docs/benchmarks.md). Still deterministic for the seed.
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


# ------------------------------------------------------------------------- encoders

def make_encoder(config: ml_collections.ConfigDict, model: models.PSCHNet,
                 mesh: Mesh):
  """jit: (params, uint8 batch) -> replicated per-image outputs for feature
  extraction and retrieval codes."""
  attention = GroupedAttention(num_parts=config.attention.num_parts,
                               temperature=config.attention.temperature,
                               uniform=config.attention.uniform)
  replicated = NamedSharding(mesh, PartitionSpec())

  @functools.partial(jax.jit, out_shardings=replicated)
  def encode(params, batch):
    images = preprocess(batch["images"], image_size=config.model.image_size,
                        channels=config.model.channels, mean=config.data.mean,
                        std=config.data.std)
    out = model.apply({"params": params}, images, train=False)
    parts = attention.apply({}, out["feature_map"])
    return {"relaxed_codes": out["relaxed_codes"],
            "global_feature": out["global_feature"],
            "pooled_feature": out["feature_map"].mean(axis=(1, 2)),
            "part_descriptors": parts.descriptors,
            "part_weights": parts.weights,
            "index": batch["index"], "mask": batch["mask"]}

  return encode


def encode_images(encode, params, source, indices: np.ndarray, *, batch_size: int,
                  mesh: Mesh, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Runs `encode` over `source[indices]` in fixed-size padded batches.

  Returns numpy arrays in the order of `indices`, one per requested key.
  """
  keys = tuple(keys)
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  chunks = {k: [] for k in keys}
  for local in pipeline.eval_batches(source, indices, batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = encode(params, _global_batch(local, sharding))
    mask = _to_host(out["mask"]).astype(bool)
    for k in keys:
      chunks[k].append(_to_host(out[k])[mask])
  return {k: np.concatenate(v) for k, v in chunks.items()}


# -------------------------------------------------------------------- pseudo labels

def _spectral_components(config: ml_collections.ConfigDict) -> int:
  """d of Eq. 1a: `pseudo_labels.spectral_components`, by default K_c."""
  p = config.pseudo_labels
  return p.spectral_components or p.num_clusters


def compute_targets(config, encode, params, source, train_indices, *, mesh,
                    epoch: int, features: str, similarity_from=None) -> tuple[dict, dict]:
  """Pseudo labels (Eq. 2) for the training images, and the part features of the
  similarity source (Eqs. 4-5) unless the similarity is computed online.

  Args:
    features: what k-means clusters: "global", "pooled", "pixels" or "spectral"
      (the k-NN graph embedding of the pixels, Eq. 1a).
    similarity_from: previous targets whose part features are kept (the frozen
      initial network's); None computes them from `params`.

  Returns:
    targets: {"pseudo_labels": int32 (N,), "cluster_affinity": f32 (K_c, K_c) r of
      Eq. 7b, "part_descriptors": f32 (N, P, C/P), "part_weights": f32 (N, P)}
      (part entries for the initial source only), "pixel_features": f32 (N, H W C)
      L2-normalised pixels (the pixels source only, Eq. 6b);
    stats: JSON-able statistics of this pseudo labelling.
  """
  need_parts = config.similarity.source == "initial" and similarity_from is None
  keys = {"pixels": [], "spectral": [], "global": ["global_feature"],
          "pooled": ["pooled_feature"]}[features]
  if need_parts:
    keys = keys + ["part_descriptors", "part_weights"]
  encoded = (encode_images(encode, params, source, train_indices,
                           batch_size=config.eval.batch_size, mesh=mesh, keys=keys)
             if keys else {})
  p = config.pseudo_labels
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _KMEANS), epoch)
  pixels = None
  if features in ("pixels", "spectral") or config.similarity.source == "pixels":
    pixels = source.read(train_indices).reshape(len(train_indices), -1)
    pixels = pixels.astype(np.float32) / 255.0
  z = pixels if features in ("pixels", "spectral") else encoded[keys[0]]
  if features == "spectral":
    # The sizes were checked against the training split by `_setup`.
    embedding_key, key = jax.random.split(key)
    embedding = spectral.spectral_embedding(embedding_key, jnp.asarray(z),
                                            num_components=_spectral_components(config),
                                            num_neighbors=p.spectral_neighbors)
    z = embedding.embedding
  labels, stats = make_pseudo_labels(
      key, jnp.asarray(z), num_clusters=p.num_clusters, keep_quantile=p.keep_quantile,
      absolute_threshold=p.absolute_threshold, n_init=p.n_init, max_iter=p.max_iter,
      tol=p.tol, mesh=make_mesh(jax.local_devices()))
  labels = np.asarray(labels, np.int32)
  targets = {"pseudo_labels": labels,
             "cluster_affinity": np.asarray(cluster_affinity(stats.centroids))}
  if config.similarity.source == "initial":
    source_targets = similarity_from if similarity_from is not None else encoded
    targets["part_descriptors"] = np.asarray(source_targets["part_descriptors"])
    targets["part_weights"] = np.asarray(source_targets["part_weights"])
  elif config.similarity.source == "pixels":
    targets["pixel_features"] = pixels / np.maximum(
        np.linalg.norm(pixels, axis=1, keepdims=True), 1e-12)
  summary = {"epoch": epoch, "features": features,
             "kept_fraction": float(stats.kept_fraction),
             "kept_fraction_per_cluster": np.asarray(
                 stats.kept_fraction_per_cluster).round(4).tolist(),
             "cluster_sizes": np.asarray(stats.cluster_sizes).tolist(),
             "inertia": float(stats.inertia),
             "kmeans_iterations": int(stats.num_iterations),
             "purity": float(purity(labels, source.labels[train_indices])),
             **stats.sanity()}
  if features == "spectral":
    summary["spectral"] = embedding.stats()
  return targets, summary


# ---------------------------------------------------------------------- update step

def make_train_step(config: ml_collections.ConfigDict, model: models.PSCHNet,
                    tx: optax.GradientTransformation, mesh: Mesh):
  """jit: (state, batch, targets) -> (state, metrics); state is donated."""
  attention = GroupedAttention(num_parts=config.attention.num_parts,
                               temperature=config.attention.temperature,
                               uniform=config.attention.uniform)
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
    labels = targets["pseudo_labels"][position]

    def loss_fn(params):
      out = model.apply({"params": params}, images, train=True,
                        rngs={"dropout": dropout_key})
      if config.similarity.source == "pixels":
        soft = pixel_similarity(targets["pixel_features"][position])
      elif config.similarity.source == "online":
        parts = attention.apply({}, jax.lax.stop_gradient(out["feature_map"]))
        soft = soft_similarity(parts.descriptors, parts.weights)
      else:
        soft = soft_similarity(targets["part_descriptors"][position],
                               targets["part_weights"][position])
      target, pair_weight = target_similarity(
          soft, labels, same_class_floor=config.similarity.same_class_floor,
          unlabelled_weight=config.similarity.unlabelled_weight,
          hard=config.similarity.hard,
          cross_cluster_ceiling=config.similarity.cross_cluster_ceiling,
          cluster_affinity=targets["cluster_affinity"])
      return psch_loss(out["relaxed_codes"], out["class_logits"], labels, target,
                       pair_weight, alpha=config.loss.alpha, beta=config.loss.beta)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()},
               "grad_norm": optax.tree.norm(grads),
               "labelled_fraction": jnp.mean(labels >= 0)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated))


# ----------------------------------------------------------------------------- loop

class _MetricsLog:
  """metrics.jsonl in the work directory (process 0), plus TensorBoard on request."""

  def __init__(self, workdir: str, tensorboard: bool):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._writer = None
    if self._active and tensorboard:
      import tensorflow as tf  # seconds to import: only on request
      self._tf = tf
      self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, record: dict) -> None:
    if not self._active:
      return
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": step, **record}, sort_keys=True) + "\n")
    if self._writer is not None:
      with self._writer.as_default(step=step):
        for k, v in record.items():
          if isinstance(v, (int, float)):
            self._tf.summary.scalar(k, v)
      self._writer.flush()


def _check_finite(metrics: dict, step: int) -> None:
  # grad_norm too: a non-finite gradient turns the params into NaN through the update,
  # and that state must never reach a checkpoint.
  bad = [k for k, v in metrics.items()
         if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(v)]
  if bad:
    raise FloatingPointError(
        f"non-finite {', '.join(sorted(bad))} at step {step}: training "
        "stopped; the last good checkpoint is kept. Lower optim.learning_rate or "
        "check the input normalisation (data.mean / data.std), and start in a new "
        "--workdir (the kept checkpoint may already be diverging).")


def _progress(total: int, initial: int, epoch: int, num_epochs: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{num_epochs}",
              unit="step", dynamic_ncols=True, leave=True)


class _Run(NamedTuple):
  """What training and evaluation share: built once per run from the config."""
  mesh: Mesh
  workdir: str
  source: Any
  index_sets: dict
  steps_per_epoch: int
  model: models.PSCHNet
  tx: optax.GradientTransformation
  encode: Any
  mngr: Any
  pretrained_backbone: Optional[dict]


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  # --- Mesh.
  mesh = make_mesh()
  psch_config.validate(config, num_devices=mesh.size)
  model = build_model(config)
  pretrained_backbone = _check_model(config, model)
  workdir = os.path.abspath(workdir)
  _check_writable(workdir)

  # --- Input.
  source, index_sets = load_data(config, workdir)
  num_train = len(index_sets["train"])
  batch_size = config.train.global_batch_size
  steps_per_epoch = num_train // batch_size
  if steps_per_epoch < 1:
    raise UserError(
        f"config.train.global_batch_size={batch_size} is larger than the "
        f"{num_train} training images; lower it.")
  if config.pseudo_labels.features == "spectral":
    spectral.check_arguments(
        num_train, num_neighbors=config.pseudo_labels.spectral_neighbors,
        num_components=_spectral_components(config))
  if source.image_shape[-1] not in (1, config.model.channels):
    raise UserError(f"{config.data.name} images have {source.image_shape[-1]} channels "
                    f"but config.model.channels={config.model.channels}.")

  # --- Optimizer.
  tx = build_optimizer(config, steps_per_epoch)
  return _Run(mesh=mesh, workdir=workdir, source=source, index_sets=index_sets,
              steps_per_epoch=steps_per_epoch, model=model, tx=tx,
              encode=make_encoder(config, model, mesh),
              mngr=checkpointing.manager(workdir, keep=config.train.keep_checkpoints),
              pretrained_backbone=pretrained_backbone)


def _check_model(config: ml_collections.ConfigDict, model: models.PSCHNet
                 ) -> Optional[dict]:
  """Fails on a model the config cannot build, before anything is allocated or written.

  Returns the pretrained backbone params (numpy) when `model.pretrained_path` is set.

  Traces the network and the part attention on abstract images (`jax.eval_shape`: no
  parameter is allocated, not even VGG-16's 138M), which raises the UserError of an
  `attention.num_parts` that does not divide the feature channels or of images too
  small for the backbone; then reads and checks the pretrained weight file.
  """
  shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
  attention = GroupedAttention(num_parts=config.attention.num_parts,
                               temperature=config.attention.temperature,
                               uniform=config.attention.uniform)

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
    return pretrained.load_vgg16_torchvision(config.model.pretrained_path)
  if config.model.backbone == "vgg16":
    logging.warning("VGG-16 starts from random weights: no model.pretrained_path given.")
  return None


def _restore(config, run: _Run):
  """(state, targets, meta) from the latest checkpoint, or None without one."""
  if run.mngr.latest_step() is None:
    return None
  replicated = NamedSharding(run.mesh, PartitionSpec())
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: _fresh_state(config, run.model, run.tx)))
  abstract_targets = _abstract_targets(config, len(run.index_sets["train"]), run.model,
                                       replicated,
                                       pixel_dim=int(np.prod(run.source.image_shape)))
  return checkpointing.restore_latest(run.mngr, abstract_state=abstract_state,
                                      abstract_targets=abstract_targets, config=config)


def _fresh_state(config, model, tx, pretrained_backbone=None) -> dict:
  params = init_params(config, model, pretrained_backbone)
  return {"params": params, "opt_state": jax.jit(tx.init)(params),
          "step": jnp.zeros((), jnp.int32)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains PSCH as `config` says, evaluates retrieval, and returns the results.

  Writes into `workdir`: splits/, checkpoints/, metrics.jsonl and results.json.
  Resumes from the latest checkpoint when there is one.
  """
  run = _setup(config, workdir)
  try:
    return _train_and_evaluate(config, run)
  finally:
    # On an error (a non-finite loss, a full disk, Ctrl-C) an asynchronous save may
    # still be writing: close() waits for it, so the newest checkpoint is complete
    # rather than a *.orbax-checkpoint-tmp directory the next run deletes.
    checkpointing.close(run.mngr)


def _train_and_evaluate(config: ml_collections.ConfigDict, run: _Run) -> dict:
  mesh, source, mngr = run.mesh, run.source, run.mngr
  train_indices = run.index_sets["train"]
  steps_per_epoch = run.steps_per_epoch
  replicated = NamedSharding(mesh, PartitionSpec())
  train_step = make_train_step(config, run.model, run.tx, mesh)
  log = _MetricsLog(run.workdir, config.train.tensorboard)

  # --- Checkpoint.
  restored = _restore(config, run)
  if jax.process_index() == 0:
    # For tools that rebuild the model from the work directory alone (search); after
    # the restore, which refuses a checkpoint of another config.
    io_utils.write_json(os.path.join(run.workdir, "config.json"), config.to_dict())
  if restored is None:
    state = jax.device_put(
        _fresh_state(config, run.model, run.tx, run.pretrained_backbone), replicated)
    targets, stats = compute_targets(config, run.encode, state["params"], source,
                                     train_indices, mesh=mesh, epoch=0,
                                     features=config.pseudo_labels.features)
    targets = jax.device_put(targets, replicated)
    log.write(0, {"pseudo_labels": stats})
    _info(f"pseudo labels: kept {stats['kept_fraction']:.3f}, purity "
          f"{stats['purity']:.3f} (diagnostic only)")
  else:
    state, targets, meta = restored
    _info(f"resumed from step {int(state['step'])} (epoch {meta['epoch']})")

  def save(step: int, state):
    checkpointing.save(mngr, step, state=state, targets=targets,
                       meta={"epoch": step // steps_per_epoch, "signature":
                             checkpointing.shape_signature(config)})

  # --- Loop.
  num_epochs = config.train.num_epochs
  step = int(state["step"])
  refresh = config.pseudo_labels.refresh_every_epochs
  while step < num_epochs * steps_per_epoch:
    epoch, start = divmod(step, steps_per_epoch)
    if start == 0 and epoch > 0 and refresh and epoch % refresh == 0:
      targets, stats = compute_targets(
          config, run.encode, state["params"], source, train_indices, mesh=mesh,
          epoch=epoch, features="global", similarity_from=targets)
      targets = jax.device_put(targets, replicated)
      log.write(step, {"pseudo_labels": stats})
    batches = pipeline.train_batches(
        source, train_indices, seed=config.seed, epoch=epoch,
        global_batch_size=config.train.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start)
    state, step = _run_epoch(config, train_step, state, targets, batches,
                             train_indices, mesh=mesh, step=step, epoch=epoch,
                             steps_per_epoch=steps_per_epoch, log=log, save=save)
    every = config.eval.validation_every_epochs
    if every and (epoch + 1) % every == 0:
      log.write(step, validate(config, run.encode, state["params"], source,
                               run.index_sets, mesh=mesh))
  mngr.wait_until_finished()

  # --- Evaluation.
  results, codes = evaluate(config, run.encode, state["params"], source,
                            run.index_sets, mesh=mesh)
  results.update({"epochs": num_epochs, "steps": step, "selection": "last epoch"})
  results.update(validate(config, run.encode, state["params"], source, run.index_sets,
                          mesh=mesh, database_codes=codes["database"]))
  _write_results(run.workdir, results, codes, source, run.index_sets)
  log.write(step, {"results": {k: v for k, v in results.items()
                               if isinstance(v, (int, float))}})
  return results


def _run_epoch(config, train_step, state, targets, batches, train_indices, *,
               mesh, step, epoch, steps_per_epoch, log, save):
  """Runs the rest of one epoch from `step`; returns (state, step) at its end.

  `save(step, state)` is called at the epoch end and every
  `train.checkpoint_every_steps` steps.
  """
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  start = step % steps_per_epoch
  bar = _progress(steps_per_epoch, start, epoch, config.train.num_epochs)
  wait = compute = 0.0
  sums, count = {}, 0
  tick = time.perf_counter()
  for local in batches:
    fetched = time.perf_counter()
    wait += fetched - tick
    local = {"images": local["images"],
             "position": np.searchsorted(train_indices, local["index"]).astype(np.int32)}
    state, metrics = train_step(state, _global_batch(local, sharding), targets)
    step += 1
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(metrics, step)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
    tick = time.perf_counter()
    compute += tick - fetched
    if bar is not None:
      images_per_s = count * config.train.global_batch_size / max(wait + compute, 1e-9)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", sim=f"{metrics['loss_sim']:.4f}",
                      cls=f"{metrics['loss_cls']:.3f}", q=f"{metrics['loss_quant']:.3f}",
                      img_s=f"{images_per_s:.0f}", refresh=False)
      bar.update(1)
    if step % steps_per_epoch == 0 or step % config.train.checkpoint_every_steps == 0:
      save(step, state)
  if bar is not None:
    bar.close()
  record = {k: v / max(count, 1) for k, v in sums.items()}
  record.update({"epoch": epoch + 1, "data_wait_fraction": wait / max(wait + compute, 1e-9),
                 "images_per_s": count * config.train.global_batch_size /
                 max(wait + compute, 1e-9)})
  log.write(step, record)
  return state, step


def _abstract_targets(config, num_train: int, model, sharding, *,
                      pixel_dim: int = 0) -> dict:
  num_clusters = config.pseudo_labels.num_clusters
  targets = {"pseudo_labels": jax.ShapeDtypeStruct((num_train,), jnp.int32,
                                                   sharding=sharding),
             "cluster_affinity": jax.ShapeDtypeStruct(
                 (num_clusters, num_clusters), jnp.float32, sharding=sharding)}
  if config.similarity.source == "initial":
    shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    attention = GroupedAttention(num_parts=config.attention.num_parts)
    fmap = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros(shape),
                                       train=False)[0]["feature_map"])
    parts = jax.eval_shape(lambda f: attention.apply({}, f),
                           jax.ShapeDtypeStruct(fmap.shape, fmap.dtype))
    targets["part_descriptors"] = jax.ShapeDtypeStruct(
        (num_train,) + parts.descriptors.shape[1:], jnp.float32, sharding=sharding)
    targets["part_weights"] = jax.ShapeDtypeStruct(
        (num_train,) + parts.weights.shape[1:], jnp.float32, sharding=sharding)
  if config.similarity.source == "pixels":
    targets["pixel_features"] = jax.ShapeDtypeStruct((num_train, pixel_dim),
                                                     jnp.float32, sharding=sharding)
  return targets


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{jax.process_index()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"work directory {workdir} is not writable ({e.strerror}); "
                    "pass a --workdir you can write to.") from e


def _info(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# ----------------------------------------------------------------------- evaluation

def _hash(config, encode, params, source, indices, *, mesh) -> np.ndarray:
  """int8 (n, L) +-1 hash codes (Eq. 12) of `source[indices]`."""
  relaxed = encode_images(encode, params, source, indices,
                          batch_size=config.eval.batch_size, mesh=mesh,
                          keys=["relaxed_codes"])["relaxed_codes"]
  return np.asarray(models.hash_codes(relaxed), np.int8)


def evaluate(config, encode, params, source, index_sets, *, mesh
             ) -> tuple[dict, dict[str, np.ndarray]]:
  """Encodes query and database, ranks by Hamming distance and scores them.

  Returns:
    results: the metrics (docs/evaluation.md) with the protocol they were computed
      under;
    codes: {"query", "database"}: int8 (n, L) +-1 hash codes (Eq. 12).
  """
  query, database = index_sets["query"], index_sets["database"]
  codes = {name: _hash(config, encode, params, source, indices, mesh=mesh)
           for name, indices in (("query", query), ("database", database))}
  metrics = evaluation.retrieval_metrics(
      codes["query"], source.labels[query], codes["database"], source.labels[database],
      topk=tuple(config.eval.topk), curves=True)
  results = {"dataset": config.data.name, "protocol": config.data.preset,
             "num_bits": config.model.num_bits, "seed": config.seed,
             "num_query": int(len(query)), "num_database": int(len(database)),
             "config_hash": config_hash(config),
             "conventions": evaluation.METRIC_CONVENTIONS, **metrics}
  return results, codes


def config_hash(config: ml_collections.ConfigDict) -> str:
  """12 hex digits identifying every field of the config (for results tables)."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def validate(config, encode, params, source, index_sets, *, mesh,
             database_codes: Optional[np.ndarray] = None) -> dict:
  """Validation mAP, for model selection: the validation images as queries against
  the training images (both inside the database, never the query set).

  Args:
    database_codes: int8 (len(database), L) codes of `index_sets["database"]` when
      they are at hand (after the final evaluation): validation and training images
      are database images (the splits are checked to be), so they are looked up
      instead of encoded again.

  Returns {"validation/map@K": ..., "validation/map@all": ...}.
  """
  val, train_set = index_sets["validation"], index_sets["train"]
  if len(val) == 0:  # tiny sets drawn with data.allow_fewer can leave none
    return {}

  def codes_of(indices):
    if database_codes is None:
      return _hash(config, encode, params, source, indices, mesh=mesh)
    return database_codes[np.searchsorted(index_sets["database"], indices)]

  metrics = evaluation.retrieval_metrics(
      codes_of(val), source.labels[val], codes_of(train_set), source.labels[train_set],
      topk=tuple(config.eval.topk), curves=False)
  return {f"validation/{k}": v for k, v in metrics.items() if k.startswith("map")}


def _write_results(workdir: str, results: dict, codes: dict[str, np.ndarray], source,
                   index_sets: dict) -> None:
  """results.json, the packed codes (codes/<split>.npy, uint32 words; Eq. 12) and the
  reports (results.md, plots), each written atomically by process 0."""
  if jax.process_index() != 0:
    return
  for name, value in codes.items():
    io_utils.save_npy(os.path.join(workdir, "codes", f"{name}.npy"),
                      np.asarray(evaluation.pack_codes(value)))
  query, database = index_sets["query"], index_sets["database"]
  reports.write_reports(workdir, results=results, codes=codes, query_indices=query,
                        database_indices=database, query_labels=source.labels[query],
                        database_labels=source.labels[database], source=source)
  # Last: a results.json means the run is complete.
  io_utils.write_json(os.path.join(workdir, "results.json"), results)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir` without training."""
  run = _setup(config, workdir)
  try:
    restored = _restore(config, run)
    if restored is None:
      raise UserError(f"no checkpoint in {run.workdir}/checkpoints to evaluate; train "
                      "first (--mode=train) or pass the --workdir of a trained run.")
    state, _, meta = restored
    results, codes = evaluate(config, run.encode, state["params"], run.source,
                              run.index_sets, mesh=run.mesh)
    results.update({"steps": int(state["step"]), "epochs": meta["epoch"],
                    "selection": "latest checkpoint"})
    _write_results(run.workdir, results, codes, run.source, run.index_sets)
  finally:
    checkpointing.close(run.mngr)
  return results


def format_results(results: dict) -> str:
  """One human-readable block: the protocol first, then every scalar metric."""
  lines = [f"{results['dataset']}, protocol {results['protocol']!r}, "
           f"{results['num_bits']} bits, seed {results['seed']}: "
           f"{results['num_query']} queries x {results['num_database']} database "
           f"images ({results['selection']})"]
  for k, v in sorted(results.items()):
    if k.startswith(("map", "precision", "validation/")) and isinstance(v, float):
      lines.append(f"  {k:<30s} {v:.4f}")
  lines.append("  (ranking by Hamming distance, ties by database index; "
               "docs/evaluation.md)")
  return "\n".join(lines)
