"""What a run is built from: mesh, data and splits, model and weights, optimizer,
encoder, checkpoint manager, the claim on the work directory.

`setup_run(config, workdir)` checks the config against the devices and the model,
claims the work directory, then builds a `Run`; `close_run` releases it. Training
(`train`), evaluation and the diagnostics share it. The pieces are public for the
benchmarks and the tests: `load_data`, `build_model`, `init_params`,
`build_optimizer`, `fresh_state`.

Reproducibility: every random draw derives from `config.seed` by `fold_in` of one of
the purpose tags below, then of the step or epoch.
"""
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from psch_jax import checkpointing
from psch_jax import config_schema
from psch_jax import encoding
from psch_jax import io_utils
from psch_jax import models
from psch_jax import pretrained
from psch_jax import sharding
from psch_jax import workdir as workdir_lib
from psch_jax.attention import GroupedAttention
from psch_jax.data import sources
from psch_jax.data import splits as splits_lib

# Purpose tags for fold_in: one independent key stream per use of randomness.
KEY_INIT, KEY_STEP, KEY_KMEANS = 0, 1, 2


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
  split_dir = io_utils.join(workdir, workdir_lib.SPLITS_DIR)
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
  key = jax.random.fold_in(jax.random.key(config.seed), KEY_INIT)
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
                attention: GroupedAttention) -> None:
  """Fails on a model the config cannot build, before anything is allocated or written.

  Traces the network and the part attention on abstract images (`jax.eval_shape`: no
  parameter is allocated, not even VGG-16's 138M), which raises the UserError of an
  `attention.num_parts` that does not divide the feature channels or of images too
  small for the backbone.
  """
  shape = (1, config.model.image_size, config.model.image_size, config.model.channels)

  def forward(key):
    out, _ = model.init_with_output(key, jnp.zeros(shape, jnp.float32), train=False)
    return attention.apply({}, out["feature_map"])

  jax.eval_shape(forward, jax.random.key(0))


def pretrained_backbone(config: ml_collections.ConfigDict) -> Optional[dict]:
  """The VGG-16 backbone params (numpy) of `model.pretrained` / `_path`, fetched once
  and checked (`pretrained.resolve_vgg16_weights`); None for another backbone. The
  schema (`config_schema.check_config`) refuses weights for another backbone."""
  if config.model.backbone != "vgg16":
    return None
  return pretrained.resolve_vgg16_weights(config.model.pretrained,
                                          config.model.pretrained_path)


class Run(NamedTuple):
  """What training, evaluation and the diagnostics share: built once per run from the
  config by `setup_run`.

  Attributes:
    mesh: the run's one device mesh (`sharding.make_mesh`: every device of every
      host).
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
  mesh = sharding.make_mesh()
  config_schema.check_config(config, num_devices=mesh.size)
  model = build_model(config)
  attention = encoding.make_attention(config)
  check_model(config, model, attention)
  backbone = pretrained_backbone(config)
  # Local: absolute (a later chdir cannot move it); gs://: kept as it is.
  workdir = os.fspath(io_utils.workdir_path(workdir))
  lock = workdir_lib.claim(workdir, config, process_index=jax.process_index())
  try:
    io_utils.check_writable(workdir, probe_name=f".write-test-{jax.process_index()}")
    if jax.process_index() == 0:
      # For tools that rebuild the model from the work directory alone (search), and
      # for the comparison of the next run on this work directory.
      io_utils.write_json(io_utils.join(workdir, workdir_lib.CONFIG_FILE),
                          config.to_dict())
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
               pretrained_backbone=backbone, lock=lock)
  except BaseException:
    lock.release()
    raise


def close_run(run: Run) -> None:
  """Waits for the checkpoint save in flight, closes the manager, releases the lock."""
  try:
    checkpointing.close(run.mngr)
  finally:
    run.lock.release()
