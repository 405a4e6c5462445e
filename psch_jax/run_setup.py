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
from psch_jax import methods
from psch_jax import models
from psch_jax import pretrained
from psch_jax import sharding
from psch_jax import workdir as workdir_lib
from psch_jax import xla_settings
from psch_jax.attention import GroupedAttention
from psch_jax.data import sources
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError

# Purpose tags for fold_in: one independent key stream per use of randomness
# (KEY_KMEANS: a method's per-epoch targets; KEY_METHOD: the draws of its loss).
KEY_INIT, KEY_STEP, KEY_KMEANS, KEY_METHOD = 0, 1, 2, 3


def load_source(config: ml_collections.ConfigDict):
  """The image source of `config.data` (prepared from the user's files first for
  the datasets our own builders make)."""
  if config.data.name in ("nus_wide", "mirflickr25k") and config.data.manual_dir:
    # Our own builders prepare the tfds copy from the user's files on first use:
    # one process writes it, the others wait and then read it.
    if jax.process_index() == 0:
      sources.prepare_manual_dataset(config.data.name, manual_dir=config.data.manual_dir,
                                     data_dir=config.data.data_dir)
    multihost_utils.sync_global_devices("psch_jax: dataset prepared")
  return sources.load_source(config.data.name, data_dir=config.data.data_dir,
                             manual_dir=config.data.manual_dir)


def draw_splits(config: ml_collections.ConfigDict, source) -> dict[str, np.ndarray]:
  """The protocol's index sets for `config` (a pure function of the labels, the
  data fields and the seed): {"query", "database", "train", "validation"}, sorted
  int64."""
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
  return index_sets


def load_data(config: ml_collections.ConfigDict, workdir: str
              ) -> tuple[Any, dict[str, np.ndarray], bool]:
  """The image source, the protocol's index sets, and whether workdir/splits holds
  them already. Reads only.

  The splits are drawn from the config (`draw_splits`); splits saved in the work
  directory must be exactly that draw, so a split file that was edited, cut or drawn
  under other data fields is refused rather than used.

  Raises:
    UserError: a saved split cannot be read, or differs from the config's draw.
  """
  source = load_source(config)
  index_sets = draw_splits(config, source)
  split_dir = io_utils.join(workdir, workdir_lib.SPLITS_DIR)
  present = [name for name in splits_lib.SPLIT_NAMES
             if io_utils.exists(io_utils.join(split_dir, f"{name}.npy"))]
  # A run killed between two split files left some of them: the rest are written
  # again (they are the same draw).
  if present:
    check_saved_splits(index_sets, split_dir, names=present,
                       num_examples=len(source))
  return source, index_sets, len(present) == len(splits_lib.SPLIT_NAMES)


def check_saved_splits(index_sets: dict[str, np.ndarray], split_dir: str, *,
                       names, num_examples: int) -> None:
  """Refuses a saved split that is not `index_sets`' (see `load_data`)."""
  for name in names:
    path = io_utils.join(split_dir, f"{name}.npy")
    saved = splits_lib.load_split_file(path, name=name, num_examples=num_examples)
    drawn = index_sets[name]
    if np.array_equal(saved, drawn):
      continue
    how = (f"it holds {len(saved)} images where the config draws {len(drawn)}"
           if len(saved) != len(drawn) else
           f"it holds {len(saved)} images, as the config draws, but other ones")
    raise UserError(
        f"{path} is not the {name} split this config draws ({how}): it was edited, "
        "or drawn under other data fields or another seed. A run evaluated on it "
        "would report numbers of another protocol. Restore the config it was drawn "
        "with, or start a new --workdir.")


def save_splits(workdir: str, index_sets: dict[str, np.ndarray]) -> None:
  """Writes workdir/splits (process 0)."""
  if jax.process_index() == 0:
    splits_lib.save_splits(index_sets, io_utils.join(workdir, workdir_lib.SPLITS_DIR))


# ------------------------------------------------------------- model and optimizer

def build_model(config: ml_collections.ConfigDict) -> models.PSCHNet:
  backbone_kwargs = {}
  if config.model.backbone == "vgg16":
    backbone_kwargs["dropout_rate"] = config.model.dropout_rate
  # .get: a work directory written before the field existed was float32 (search).
  dtype = models.compute_dtype(config.model.get("compute_dtype", "float32"))
  return models.create_model(config.model.backbone, num_bits=config.model.num_bits,
                             num_classes=methods.for_config(config).classifier_outputs(
                                 config),
                             dtype=dtype, **backbone_kwargs)


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


def device_memory_bytes() -> Optional[int]:
  """The memory one local device can allocate: the accelerator's `bytes_limit`, or
  on CPU the host's physical memory (not divided among the devices of
  --xla_force_host_platform_device_count: `check_memory` is a lower bound, and must
  never refuse what runs); None when neither is known."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def check_memory(config: ml_collections.ConfigDict, model: models.PSCHNet, *,
                 num_devices: int) -> None:
  """Refuses a config whose training step or evaluation cannot fit one device, before
  anything is allocated: a lower bound (what is refused can never run; what passes
  may still not fit).

  The bound per device, from shapes alone (`jax.eval_shape`, `jax.make_jaxpr`): the
  params, their gradients and the optimizer's moments (Adam two, SGD one), plus for
  each image of the per-device batch its float32 input and the largest single
  activation of the forward pass that grows with the batch (the traces of one and
  two images differ by it); for evaluation the params plus the same per image of the
  per-device `eval.batch_size`.

  Raises:
    UserError: naming the fields that set the size, the bytes needed and the device's.
  """
  available = device_memory_bytes()
  if available is None:
    return

  def images(n):
    return jax.ShapeDtypeStruct((n, config.model.image_size, config.model.image_size,
                                 config.model.channels), jnp.float32)

  params = jax.eval_shape(lambda k, x: model.init(k, x, train=False)["params"],
                          jax.random.key(0), images(1))
  one, two = (jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, train=False))(
      params, images(n)) for n in (1, 2))
  growth = [_nbytes([b.aval for b in eb.outvars]) - _nbytes([a.aval for a in ea.outvars])
            for ea, eb in zip(one.eqns, two.eqns)]
  per_image = _nbytes(images(1)) + max(growth, default=0)
  param_bytes = _nbytes(params)
  state_bytes = (3 if config.optim.name == "adam" else 2) * param_bytes + param_bytes
  parts = {
      "training step": (state_bytes, "params, gradients and optimizer state",
                        config.train.global_batch_size // num_devices,
                        "config.train.global_batch_size"),
      "evaluation": (param_bytes, "params", config.eval.batch_size // num_devices,
                     "config.eval.batch_size"),
  }
  for what, (fixed, held, batch, batch_field) in parts.items():
    needed = fixed + batch * per_image
    if needed <= available:
      continue
    fields = ("config.model.num_bits or config.model.image_size (the params alone "
              "do not fit)" if fixed > available else
              f"{batch_field} or config.model.image_size")
    raise UserError(
        f"the {what} needs at least {needed / 2**30:.1f} GiB per device "
        f"({fixed / 2**30:.2f} GiB of {held}, {batch} images of "
        f"{per_image / 2**20:.1f} MiB), and a device has {available / 2**30:.1f} GiB. "
        f"Lower {fields}, or run on devices with more memory.")


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
    verified_step: the newest checkpoint step whose checksums `setup_run` verified
      (`checkpointing.check_newest`), or None.
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
  verified_step: Optional[int]


# What each mode of `setup_run` accepts, writes and needs.
TRAIN, EVAL, DIAGNOSE = "train", "eval", "diagnose"
_COMMANDS = {TRAIN: "main.py --mode=train", EVAL: "main.py --mode=eval",
             DIAGNOSE: "the diagnostics command"}
_KINDS = {TRAIN: (workdir_lib.RUN,), EVAL: (workdir_lib.RUN,),
          DIAGNOSE: (workdir_lib.RUN, workdir_lib.DIAGNOSTICS)}


def setup_run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = TRAIN,
              check: Optional[Any] = None) -> Run:
  """Checks everything, then claims the work directory and builds the run (mesh,
  data and splits, model, optimizer, encoder, checkpoint manager). Close it with
  `close_run`.

  Check everything, then write (docs/reliability.md): the config against the
  devices, the model and their memory; the work directory's layout, kind and
  config.json; the data and the saved splits against the config; for `EVAL` a
  checkpoint to evaluate; then `check(index_sets)` of the caller. Only then is the
  work directory created and locked (`workdir.claim`, which repeats its checks under
  the lock) and written: its kind, config.json and splits (`TRAIN` and `DIAGNOSE`;
  `EVAL` writes only its results, later). A refused start leaves the directory
  byte for byte as it was, and one that did not exist absent.

  Args:
    mode: TRAIN (main.py), EVAL (main.py --mode=eval: needs a checkpoint) or
      DIAGNOSE (the diagnostics command: a run's directory or its own).
    check: called with the index sets before anything is written; raises UserError.

  Raises:
    UserError: the config does not fit (devices, memory, model, data), the work
      directory is not writable, has a wrong layout or kind, is in use or holds a run
      of another config, a saved split is not the config's, or (EVAL) there is no
      checkpoint.
  """
  mesh = sharding.make_mesh()
  config_schema.check_config(config, num_devices=mesh.size)
  xla_settings.check_in_effect(config)
  model = build_model(config)
  attention = encoding.make_attention(config)
  check_model(config, model, attention)
  check_memory(config, model, num_devices=mesh.size)
  # Local: absolute (a later chdir cannot move it); gs://: kept as it is.
  workdir = os.fspath(io_utils.workdir_path(workdir))
  kinds, command = _KINDS[mode], _COMMANDS[mode]
  workdir_lib.check_unclaimed(workdir, config, kinds=kinds, command=command)
  if mode == EVAL and checkpointing.latest_step(workdir) is None:
    raise UserError(f"no checkpoint in {workdir}/{workdir_lib.CHECKPOINTS_DIR} to "
                    "evaluate; train first (--mode=train) or pass the --workdir of a "
                    "trained run.")
  verified_step = None if mode == DIAGNOSE else checkpointing.check_newest(workdir)
  backbone = pretrained_backbone(config)
  source, index_sets, splits_saved = load_data(config, workdir)
  config_schema.check_against_data(
      config, num_train=len(index_sets["train"]),
      num_database=len(index_sets["database"]), num_query=len(index_sets["query"]),
      num_validation=len(index_sets["validation"]),
      image_channels=source.image_shape[-1])
  if check is not None:
    check(index_sets)

  lock = workdir_lib.claim(workdir, config, kinds=kinds, command=command,
                           process_index=jax.process_index())
  try:
    io_utils.check_writable(workdir, probe_name=f".write-test-{jax.process_index()}")
    if mode != EVAL and jax.process_index() == 0:
      workdir_lib.write_kind(workdir, workdir_lib.DIAGNOSTICS if mode == DIAGNOSE and
                             workdir_lib.saved_kind(workdir) is None
                             else workdir_lib.RUN)
      # For tools that rebuild the model from the work directory alone (search), and
      # for the comparison of the next run on this work directory. Written before
      # the splits, so a run killed after drawing them is compared on its rerun too.
      io_utils.write_json(io_utils.join(workdir, workdir_lib.CONFIG_FILE),
                          config.to_dict())
    if mode != EVAL and not splits_saved:
      save_splits(workdir, index_sets)
    steps_per_epoch = len(index_sets["train"]) // config.train.global_batch_size
    tx = build_optimizer(config, steps_per_epoch)
    mngr = checkpointing.manager(workdir, keep=config.train.keep_checkpoints,
                                 create=mode != EVAL)
    # Process 0 has recorded the checksums of every committed step (the manager):
    # the other processes verify against them.
    multihost_utils.sync_global_devices("psch_jax: work directory written")
    return Run(mesh=mesh, workdir=workdir, source=source, index_sets=index_sets,
               steps_per_epoch=steps_per_epoch, model=model, attention=attention,
               tx=tx, encode=encoding.make_encoder(config, model, mesh,
                                                   attention=attention),
               mngr=mngr, pretrained_backbone=backbone, lock=lock,
               verified_step=verified_step)
  except BaseException:
    lock.release()
    raise


def close_run(run: Run) -> None:
  """Waits for the checkpoint save in flight, closes the manager, releases the lock."""
  try:
    checkpointing.close(run.mngr)
  finally:
    run.lock.release()
