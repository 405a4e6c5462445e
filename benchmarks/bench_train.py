"""Benchmark: training throughput against PyTorch, and where a real run spends time.

1. Train step: images/s of `psch_jax.train.make_train_step` on a
   1-device mesh against the same network, loss and optimizer written in PyTorch
   layer by layer, same batch, same thread count, after a warm-up:
   - "small_cnn": configs/fashion_mnist.py (SmallCNN, 28 x 28 x 1, batch 128);
   - "vgg16": configs/cifar10.py with VGG-16 at 32 x 32 x 3, batch 32, dropout 0.5,
     crop-and-flip augmentation (fc6 is 25,088 x 4,096 as at 224 x 224).
   Both steps do: uint8 -> normalised float (and augmentation), forward, the soft
   similarity of precomputed part features (Eq. 6), the target matrix (Eq. 7), the
   PSCH loss (Eqs. 8-11) with random pseudo labels (30 % unlabelled), backward,
   global-norm clipping and AdamW with one parameter group for the backbone and one
   for the head. Rounds alternate between the two frameworks; the table gives the
   median step time over all rounds, and the median process CPU time per step.
   `--breakdown` then times the parts alone in both frameworks: the conv stack
   forward, forward + backward, the dense layers, clipping + AdamW.
2. The training loop (`--loop`): `train.run_epoch` end to end (input rows -> global
   batch -> step -> metrics -> progress -> metrics.jsonl) over synthetic batches on
   a 1-device mesh, reading the metrics from the device after every step
   (`train.log_every_steps=1`, what the loop did before that field) against every 50
   steps (the default), rounds alternating, same process: steps/s of each and the
   ratio. For configs/fashion_mnist.py:tiny (SmallCNN, batch 16) and
   configs/fashion_mnist.py (SmallCNN, batch 128).
3. Phases of a real run: `train.train_and_evaluate` on
   configs/fashion_mnist.py with fewer epochs, in this process, with each phase
   (setup, pseudo labels with feature extraction and k-means, training epochs with
   the data wait from metrics.jsonl, checkpoint saves, evaluation, validation) timed
   by wrapping the functions of psch_jax.train that run it. Nothing in the library
   changes; the wrappers only read the clock.
4. Methods (`--methods`): images/s of the train step of PSCH and of each deep peer
   (`psch_jax.methods`) on the same network and batch, rounds alternating the
   methods, with the ratio to PSCH's step: a two-view method (CIBHash) runs the
   network twice per image, and a step slower than its views explain shows here.

Run from the repository root:
  python -m benchmarks.bench_train --breakdown        (everything, about 10 min on
                                                       2 cores)
  python -m benchmarks.bench_train --quick            (a check that it runs)
  python -m benchmarks.bench_train --steps-only --models=vgg16 --vgg16-steps=5
  python -m benchmarks.bench_train --phases-only --override train.num_epochs=2
  python -m benchmarks.bench_train --loop          (the loop alone; with --quick: a
                                                    check that it runs)
  python -m benchmarks.bench_train --methods --models=small_cnn
                                                   (the step of every method)

JAX's CPU backend uses every core for one device; PyTorch gets
`torch.set_num_threads(<cores>)`. Torch runs NCHW (its default, where oneDNN picks
its own blocked layout for convolutions).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Callable

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from benchmarks import describe_machine, peak_rss_mib, print_table
from psch_jax import checkpointing
from psch_jax import cli
from psch_jax import config as psch_config
from psch_jax import encoding
from psch_jax import io_utils
from psch_jax import methods
from psch_jax import models
from psch_jax import monitoring
from psch_jax import ranking
from psch_jax import run_setup
from psch_jax import sharding
from psch_jax import targets as targets_lib
from psch_jax import train
from psch_jax.evaluators import retrieval

FLAGS = flags.FLAGS
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLABELLED_FRACTION = 0.3


# --------------------------------------------------------------------- configs

def repo_config(name: str):
  """The config file `configs/<name>.py` as `get_config()` returns it."""
  return psch_config.load_config(os.path.join(REPO_ROOT, "configs", f"{name}.py"))


def step_config(model_name: str):
  """The config each train-step benchmark uses (see the module docstring)."""
  if model_name == "small_cnn":
    return repo_config("fashion_mnist")
  if model_name == "vgg16":
    config = repo_config("cifar10")
    config.model.image_size = 32
    config.train.global_batch_size = 32
    return config
  raise ValueError(f"unknown model {model_name!r}; use small_cnn or vgg16")


# ------------------------------------------------------------------ shared data

def make_inputs(config, num_train: int, part_shape: tuple[int, int], seed: int = 0
                ) -> dict[str, np.ndarray]:
  """Random uint8 batch, positions, pseudo labels and part features (numpy)."""
  rng = np.random.default_rng(seed)
  batch = config.train.global_batch_size
  size, channels = config.model.image_size, config.model.channels
  num_clusters = config.pseudo_labels.num_clusters
  labels = rng.integers(0, num_clusters, num_train).astype(np.int32)
  labels[rng.random(num_train) < UNLABELLED_FRACTION] = -1
  num_parts, part_dim = part_shape
  # Non-negative like ReLU features, weights a softmax over the parts (Eq. 5).
  descriptors = np.abs(rng.standard_normal((num_train, num_parts, part_dim),
                                           dtype=np.float32))
  logits = rng.standard_normal((num_train, num_parts)).astype(np.float32)
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return {
      "images": rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8),
      "position": rng.choice(num_train, batch, replace=False).astype(np.int32),
      "pseudo_labels": labels,
      # r of Eq. 7b as the identity: every pair of two different clusters gets the
      # target -1, as in Eq. 7, which the PyTorch step computes.
      "cluster_affinity": np.eye(num_clusters, dtype=np.float32),
      "part_descriptors": descriptors,
      "part_weights": weights.astype(np.float32),
  }


def part_shape_of(config, model) -> tuple[int, int]:
  """(P, C / P) of the grouped attention on this model's feature map."""
  config = config.copy_and_resolve_references()
  config.similarity.source = "initial"  # the source that stores part features
  abstract = targets_lib.abstract_targets(config, 1, model, None)
  return tuple(abstract["part_descriptors"].shape[1:])


# -------------------------------------------------------------------------- JAX

def jax_step_runner(config, inputs: dict[str, np.ndarray],
                    targets: dict[str, np.ndarray] | None = None
                    ) -> Callable[[], None]:
  """One call = one `train.make_train_step` step on a 1-device mesh, synchronised.
  `targets`: the method's training-set targets (None: PSCH's, from `inputs`)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = run_setup.build_model(config)
  tx = run_setup.build_optimizer(config, steps_per_epoch=100)
  step_fn = train.make_train_step(config, model, tx, mesh)
  replicated = sharding.replicated(mesh)
  sharded = sharding.batch_sharding(mesh)
  state = jax.device_put(run_setup.fresh_state(config, model, tx), replicated)
  if targets is None:
    targets = {k: inputs[k] for k in ("pseudo_labels", "cluster_affinity",
                                      "part_descriptors", "part_weights")}
  targets = jax.device_put(targets, replicated)
  batch = jax.device_put({"images": inputs["images"], "position": inputs["position"]},
                         sharded)
  holder = {"state": state}

  def run() -> None:
    holder["state"], metrics = step_fn(holder["state"], batch, targets)
    # The training loop reads the metrics every step, which also synchronises.
    jax.device_get(metrics)

  return run


# ---------------------------------------------------------------------- PyTorch

def torch_model_and_optimizer(config):
  """PSCHNet (backbone, hash head, classifier) and AdamW, mirroring psch_jax."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  channels = config.model.channels
  num_bits = config.model.num_bits
  num_clusters = config.pseudo_labels.num_clusters

  class SmallCNN(nn.Module):
    """psch_jax.models.SmallCNN defaults: 3 x [conv3x3 + ReLU, max-pool 2], dense."""

    def __init__(self, size: int):
      super().__init__()
      widths, previous, layers = (32, 64, 128), channels, []
      for width in widths:
        layers.append(nn.Conv2d(previous, width, 3, padding=1))
        previous = width
      self.convs = nn.ModuleList(layers)
      pooled = size
      for _ in widths:
        pooled //= 2
      self.dense = nn.Linear(widths[-1] * pooled * pooled, 512)

    def conv_features(self, x):
      """(last conv map before its pool, pooled map flattened)."""
      feature_map = x
      for conv in self.convs:
        x = torch.relu(conv(x))
        feature_map = x
        x = nn.functional.max_pool2d(x, 2)
      return feature_map, x.flatten(1)

    def dense_features(self, flat):
      return torch.relu(self.dense(flat))

    def forward(self, x):
      feature_map, flat = self.conv_features(x)
      return feature_map, self.dense_features(flat)

  class VGG16(nn.Module):
    """torchvision VGG-16 "D" without BatchNorm and without the 1000-way layer."""

    def __init__(self, dropout: float):
      super().__init__()
      previous, layers = channels, []
      for entry in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512,
                    "M", 512, 512, 512, "M"):
        if entry == "M":
          layers.append(None)
        else:
          layers.append(nn.Conv2d(previous, entry, 3, padding=1))
          previous = entry
      self.convs = nn.ModuleList([l for l in layers if l is not None])
      self.pattern = [l is None for l in layers]
      self.fc6 = nn.Linear(512 * 7 * 7, 4096)
      self.fc7 = nn.Linear(4096, 4096)
      self.dropout = nn.Dropout(dropout)

    def conv_features(self, x):
      """(conv5_3 map before the last pool, 7 x 7 average-pooled map flattened)."""
      convs, feature_map = iter(self.convs), x
      for is_pool in self.pattern:
        if is_pool:
          feature_map = x
          x = nn.functional.max_pool2d(x, 2)
        else:
          x = torch.relu(next(convs)(x))
      return feature_map, nn.functional.adaptive_avg_pool2d(x, (7, 7)).flatten(1)

    def dense_features(self, flat):
      x = self.dropout(torch.relu(self.fc6(flat)))
      return self.dropout(torch.relu(self.fc7(x)))

    def forward(self, x):
      feature_map, flat = self.conv_features(x)
      return feature_map, self.dense_features(flat)

  class PSCHNet(nn.Module):

    def __init__(self):
      super().__init__()
      if config.model.backbone == "vgg16":
        self.backbone, feature_dim = VGG16(config.model.dropout_rate), 4096
      else:
        self.backbone, feature_dim = SmallCNN(config.model.image_size), 512
      self.hash_head = nn.Linear(feature_dim, num_bits)
      self.classifier = nn.Linear(num_bits, num_clusters)

    def forward(self, x):
      _, global_feature = self.backbone(x)
      codes = torch.tanh(self.hash_head(global_feature))
      return codes, self.classifier(codes)

  model = PSCHNet().train()
  o = config.optim
  optimizer = torch.optim.AdamW([
      {"params": model.backbone.parameters(),
       "lr": o.learning_rate * o.backbone_lr_multiplier},
      {"params": list(model.hash_head.parameters()) +
                 list(model.classifier.parameters()), "lr": o.learning_rate}],
      weight_decay=o.weight_decay)
  return model, optimizer


def torch_step_runner(config, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
  """One call = one step of the same network, loss and optimizer in PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  model, optimizer = torch_model_and_optimizer(config)
  o = config.optim
  num_bits = config.model.num_bits
  mean = torch.tensor(config.data.mean, dtype=torch.float32).view(1, -1, 1, 1)
  std = torch.tensor(config.data.std, dtype=torch.float32).view(1, -1, 1, 1)
  images_u8 = torch.from_numpy(inputs["images"])  # (B, H, W, C) uint8, as shipped.
  position = torch.from_numpy(inputs["position"]).long()
  all_labels = torch.from_numpy(inputs["pseudo_labels"]).long()
  all_descriptors = torch.from_numpy(inputs["part_descriptors"])
  all_weights = torch.from_numpy(inputs["part_weights"])
  floor, mu = config.similarity.same_class_floor, config.similarity.unlabelled_weight
  alpha, beta = config.loss.alpha, config.loss.beta
  augment = config.data.augment

  def preprocess_and_augment():
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    x = (x - mean) / std
    if augment == "none":
      return x
    batch, _, height, width = x.shape
    flip = torch.rand(batch) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if augment == "crop_flip":
      padded = nn.functional.pad(x, (4, 4, 4, 4))
      offsets = torch.randint(0, 9, (batch, 2))
      rows = (offsets[:, 0:1] + torch.arange(height)).view(batch, height, 1)
      cols = (offsets[:, 1:2] + torch.arange(width)).view(batch, 1, width)
      x = padded[torch.arange(batch).view(-1, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    return x

  def loss_fn(codes, logits):
    labels = all_labels[position]
    with torch.no_grad():  # Eqs. 6-7: constants of the loss.
      descriptors, weights = all_descriptors[position], all_weights[position]
      unit = descriptors * torch.rsqrt(
          torch.clamp((descriptors * descriptors).sum(-1, keepdim=True), min=1e-24))
      weighted = unit * weights[..., None]
      soft = 0.5 * (torch.einsum("ipd,jpd->ij", weighted, unit)
                    + torch.einsum("ipd,jpd->ij", unit, weighted))
      labelled = labels >= 0
      both = labelled[:, None] & labelled[None, :]
      same = both & (labels[:, None] == labels[None, :])
      target = torch.where(same, floor + (1 - floor) * soft,
                           torch.where(both, torch.full_like(soft, -1.0),
                                       2 * soft - 1))
      off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
      pair_weight = torch.where(both, 1.0, mu) * off_diagonal
    inner = codes @ codes.T
    sim = (pair_weight * (inner / num_bits - target) ** 2).sum() / torch.clamp(
        pair_weight.sum(), min=1e-12)
    labelled = labels >= 0
    cross_entropy = nn.functional.cross_entropy(
        logits, torch.where(labelled, labels, 0), reduction="none")
    cls = torch.where(labelled, cross_entropy, 0.0).sum() / torch.clamp(
        labelled.sum(), min=1)
    signs = torch.where(codes >= 0, 1.0, -1.0).detach()
    quant = ((codes - signs) ** 2).sum(-1).mean() / num_bits
    return sim + alpha * cls + beta * quant

  def run() -> None:
    optimizer.zero_grad(set_to_none=True)
    codes, logits = model(preprocess_and_augment())
    loss = loss_fn(codes, logits)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    optimizer.step()
    loss.detach().item()  # As the JAX loop reads its metrics.

  return run


# -------------------------------------------------------------------- breakdown

def _conv_plan(config) -> list[str | None]:
  """Backbone conv param names in order, None for a 2 x 2 max-pool."""
  if config.model.backbone == "vgg16":
    names, plan = iter(models.vgg16_conv_names()), []
    for entry in models.VGG16_CONFIG_D:
      plan.append(None if entry == "M" else next(names))
    return plan
  return [name for block in (1, 2, 3) for name in (f"block{block}_conv1", None)]


def jax_part_runners(config, images: np.ndarray) -> dict[str, Callable[[], None]]:
  """The train step's parts, each jitted alone: conv stack forward, and forward +
  backward (gradients of the conv weights), dense layers forward + backward,
  clipping + AdamW update of every parameter."""
  model = run_setup.build_model(config)
  params = run_setup.init_params(config, model)
  backbone = params["backbone"]
  plan = _conv_plan(config)
  conv_params = {name: backbone[name] for name in plan if name}
  dense_names = ["fc6", "fc7"] if config.model.backbone == "vgg16" else ["global_dense"]
  dense_params = {name: backbone[name] for name in dense_names}
  x = jnp.asarray((images.astype(np.float32) / 255.0 - 0.5) / 0.25)

  def conv_loss(conv_params, x):
    for name in plan:
      if name is None:
        x = flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      else:
        x = jax.lax.conv_general_dilated(
            x, conv_params[name]["kernel"], (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + conv_params[name]["bias"])
    return jnp.sum(x)

  def dense_loss(dense_params, flat):
    for name in dense_names:
      layer = dense_params[name]
      flat = jax.nn.relu(flat @ layer["kernel"] + layer["bias"])
    return jnp.sum(flat)

  flat = jnp.asarray(np.random.default_rng(0).random(
      (x.shape[0], dense_params[dense_names[0]]["kernel"].shape[0]), np.float32))
  conv_forward = jax.jit(conv_loss)
  conv_grad = jax.jit(jax.grad(conv_loss))
  dense_grad = jax.jit(jax.grad(dense_loss))
  tx = run_setup.build_optimizer(config, steps_per_epoch=100)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  holder = {"params": params, "opt_state": jax.jit(tx.init)(params)}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def optimizer_step() -> None:
    holder["params"], holder["opt_state"] = jax.block_until_ready(
        update(holder["params"], holder["opt_state"], grads))

  return {
      "conv stack forward":
          lambda: jax.block_until_ready(conv_forward(conv_params, x)),
      "conv stack forward + backward":
          lambda: jax.block_until_ready(conv_grad(conv_params, x)),
      "dense layers forward + backward":
          lambda: jax.block_until_ready(dense_grad(dense_params, flat)),
      "clip + AdamW update": optimizer_step,
  }


def torch_part_runners(config, images: np.ndarray) -> dict[str, Callable[[], None]]:
  """The same parts as `jax_part_runners`, in PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel
  model, optimizer = torch_model_and_optimizer(config)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
  backbone = model.backbone
  dense_in = (backbone.fc6 if config.model.backbone == "vgg16" else
              backbone.dense).in_features
  flat = torch.rand(x.shape[0], dense_in)

  def backward(loss) -> None:
    model.zero_grad(set_to_none=True)
    loss.backward()

  grads = [torch.full_like(p, 1e-3) for p in model.parameters()]

  def optimizer_step() -> None:
    for p, g in zip(model.parameters(), grads):
      p.grad = g
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
    optimizer.step()

  def forward_only() -> None:
    with torch.no_grad():
      backbone.conv_features(x)[1].sum().item()

  return {
      "conv stack forward": forward_only,
      "conv stack forward + backward":
          lambda: backward(backbone.conv_features(x)[1].sum()),
      "dense layers forward + backward":
          lambda: backward(backbone.dense_features(flat).sum()),
      "clip + AdamW update": optimizer_step,
  }


def breakdown_benchmark(model_names: list[str], *, steps: dict[str, int],
                        warmup: int) -> None:
  """Times the parts of the train step alone, in both frameworks (median)."""
  counts = ", ".join(f"{steps[name]} ({name})" for name in model_names)
  print(f"\n## Train step broken into parts, median of {counts} runs each after "
        f"{warmup} warm-up runs\n", flush=True)
  rows = []
  for name in model_names:
    num_steps = steps[name]
    config = step_config(name)
    images = make_inputs(config, 1000, (1, 1))["images"]
    runners = {"torch": torch_part_runners(config, images),
               "ours": jax_part_runners(config, images)}
    medians = {}
    for framework, parts in runners.items():
      for part, run in parts.items():
        time_steps(run, warmup)
        times = time_steps(run, num_steps)
        medians[framework, part] = (statistics.median(w for w, _ in times),
                                    statistics.median(c for _, c in times))
    for part in runners["ours"]:
      (torch_wall, torch_cpu), (ours_wall, ours_cpu) = (medians["torch", part],
                                                        medians["ours", part])
      rows.append((name, part, torch_wall, ours_wall, ours_wall / torch_wall,
                   torch_cpu, ours_cpu))
    del runners
  print_table(("network", "part", "torch s", "ours s", "ours / torch", "torch CPU s",
               "ours CPU s"), rows)


# ------------------------------------------------------------------ step timing

def time_steps(run: Callable[[], None], steps: int) -> list[tuple[float, float]]:
  """(wall, process CPU) seconds of each of `steps` calls."""
  times = []
  for _ in range(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    times.append((time.perf_counter() - wall, time.process_time() - cpu))
  return times


def interleaved_times(runners: dict[str, Callable[[], None]], *, steps: int,
                      rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
  """{name: (wall, CPU) seconds per step} of each runner: `warmup` untimed steps
  each (compiles, warms the allocators), then `rounds` rounds of `steps` steps that
  alternate the runners, so a slower or busier stretch of the machine hits all."""
  for run in runners.values():
    time_steps(run, warmup)
  times = {k: [] for k in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      times[name] += time_steps(run, steps)
  return times


def step_benchmark(model_names: list[str], *, steps: dict[str, int], rounds: int,
                   warmup: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  counts = ", ".join(f"{steps[name]} ({name})" for name in model_names)
  print(f"\n## Train step, {counts} steps x {rounds} rounds per framework (after "
        f"{warmup} warm-up steps); torch threads {torch.get_num_threads()}, "
        f"oneDNN {torch.backends.mkldnn.is_available()}; JAX 1-device mesh "
        f"({jax.devices()[0].device_kind})\n", flush=True)
  rows = []
  for name in model_names:
    config = step_config(name)
    model = run_setup.build_model(config)
    num_train = max(4 * config.train.global_batch_size, 1000)
    inputs = make_inputs(config, num_train, part_shape_of(config, model))
    runners = {"torch": torch_step_runner(config, inputs),
               "ours": jax_step_runner(config, inputs)}
    times = interleaved_times(runners, steps=steps[name], rounds=rounds,
                              warmup=warmup)
    batch = config.train.global_batch_size
    medians = {k: (statistics.median(w for w, _ in v),
                   statistics.median(c for _, c in v)) for k, v in times.items()}
    (torch_wall, torch_cpu), (ours_wall, ours_cpu) = medians["torch"], medians["ours"]
    size = config.model.image_size
    rows.append((f"{name} {size}x{size}x{config.model.channels}, batch {batch}",
                 torch_wall, ours_wall, ours_wall / torch_wall, batch / torch_wall,
                 batch / ours_wall, torch_cpu, ours_cpu))
    del runners
  print_table(("network", "torch s/step", "ours s/step", "ours / torch",
               "torch img/s", "ours img/s", "torch CPU s/step", "ours CPU s/step"),
              rows)


# --------------------------------------------------------------------- methods

def peer_targets(config, model, num_train: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random targets of the shapes `config.method.name` keeps: unit feature rows, and
  for SSDH thresholds that leave about a third of the pairs known."""
  rng = np.random.default_rng(seed)
  pixel_dim = config.model.image_size**2 * config.model.channels
  shapes = methods.for_config(config).abstract_targets(
      config, num_train, model, None, pixel_dim=pixel_dim, attention=None)
  targets = {}
  for name, shape in shapes.items():
    if name == "thresholds":
      targets[name] = np.array([0.2, 0.3], np.float32)
    else:
      targets[name] = targets_lib.unit_rows(rng.random(shape.shape))
  return targets


def method_benchmark(model_names: list[str], *, steps: dict[str, int], rounds: int,
                     warmup: int) -> list[tuple]:
  """images/s of the train step of every method of `psch_jax.methods` on the same
  network and batch (`step_config`), rounds alternating the methods; the ratio to
  PSCH's step, and the views each method runs the network on."""
  print(f"\n## Train step per method, {rounds} rounds (after {warmup} warm-up "
        f"steps); JAX 1-device mesh ({jax.devices()[0].device_kind})\n", flush=True)
  rows = []
  for name in model_names:
    base = step_config(name)
    model = run_setup.build_model(base)
    num_train = max(4 * base.train.global_batch_size, 1000)
    inputs = make_inputs(base, num_train, part_shape_of(base, model))
    runners = {}
    for method in psch_config.METHODS:
      config = base.copy_and_resolve_references()
      config.method.name = method
      targets = (None if method == "psch" else
                 peer_targets(config, run_setup.build_model(config), num_train))
      runners[method] = jax_step_runner(config, inputs, targets)
    times = interleaved_times(runners, steps=steps[name], rounds=rounds,
                              warmup=warmup)
    batch = base.train.global_batch_size
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    for method in runners:
      rows.append((f"{name}, batch {batch}", method,
                   methods.get(method).num_views, batch / wall[method],
                   wall[method] / wall["psch"]))
    del runners
  print_table(("network", "method", "views", "img/s", "s/step vs PSCH"), rows)
  return rows


# ------------------------------------------------------------------------ loop

# Name -> (configs/<file>.py, variant).
LOOP_CONFIGS = {"fashion_mnist:tiny": ("fashion_mnist", "tiny"),
                "fashion_mnist": ("fashion_mnist", "")}


def loop_runner(config, steps: int) -> Callable[[int], float]:
  """run(log_every_steps) = seconds of one `train.run_epoch` of `steps` steps over
  random batches on a 1-device mesh (no checkpoint is written: `save` does nothing)."""
  config = config.copy_and_resolve_references()
  config.train.checkpoint_every_steps = 10 * steps
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = run_setup.build_model(config)
  batch = config.train.global_batch_size
  num_train = steps * batch
  inputs = make_inputs(config, num_train, part_shape_of(config, model))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (num_train,) + inputs["images"].shape[1:], np.uint8)
  order = [rng.permutation(num_train)[:batch] for _ in range(steps)]
  tx = run_setup.build_optimizer(config, steps_per_epoch=steps)
  step_fn = train.make_train_step(config, model, tx, mesh)
  replicated = sharding.replicated(mesh)
  holder = {"state": jax.device_put(run_setup.fresh_state(config, model, tx), replicated)}
  targets = jax.device_put({k: inputs[k] for k in
                            ("pseudo_labels", "cluster_affinity", "part_descriptors",
                             "part_weights")}, replicated)
  workdir = tempfile.mkdtemp(prefix="bench_loop_")

  def run(log_every_steps: int) -> float:
    config.train.log_every_steps = log_every_steps
    batches = ({"images": images[index], "index": index} for index in order)
    start = time.perf_counter()
    loop = train.EpochLoop(train_step=step_fn, mesh=mesh,
                           train_indices=np.arange(num_train), steps_per_epoch=steps,
                           log=monitoring.MetricsLog(workdir, tensorboard=False),
                           save=lambda step, state: None)
    holder["state"], _ = train.run_epoch(config, loop, holder["state"], targets,
                                         batches, step=0)
    jax.block_until_ready(holder["state"])
    return time.perf_counter() - start

  return run


def loop_benchmark(names: list[str], *, steps: int, rounds: int) -> list[tuple]:
  """Median seconds per epoch of `steps` steps with the metrics read every step and
  every 50 steps, rounds alternating after one warm-up epoch of each."""
  print(f"\n## Training loop: train.run_epoch, {steps} steps x {rounds} rounds per "
        f"setting (after 1 warm-up epoch each), 1-device mesh "
        f"({jax.devices()[0].device_kind}), load average at start "
        f"{os.getloadavg()[0]:.1f}\n", flush=True)
  settings = {"every step": 1, "every 50 steps": 50}
  rows = []
  for name in names:
    config = _loop_config(name)
    run = loop_runner(config, steps)
    for every in settings.values():
      run(every)  # Compiles and warms the allocators.
    times = {label: [] for label in settings}
    for _ in range(rounds):
      for label, every in settings.items():
        times[label].append(run(every))
    per_step = {label: statistics.median(t) / steps for label, t in times.items()}
    before, after = per_step["every step"], per_step["every 50 steps"]
    rows.append((f"{name} (SmallCNN, batch {config.train.global_batch_size})",
                 1 / before, 1 / after, before / after))
  print_table(("config", "steps/s, read every step", "steps/s, read every 50",
               "ratio (every 50 / every step)"), rows)
  return rows


def _loop_config(name: str):
  module, variant = LOOP_CONFIGS[name]
  suffix = f":{variant}" if variant else ""
  return psch_config.load_config(os.path.join(REPO_ROOT, "configs", f"{module}.py{suffix}"))


# --------------------------------------------------------------------- phases

class PhaseTimer:
  """Accumulates wall time per named phase; a phase inside another is its child."""

  def __init__(self):
    self.seconds: dict[tuple[str, ...], float] = {}
    self.calls: dict[tuple[str, ...], int] = {}
    self.peak_mib: dict[tuple[str, ...], float] = {}
    self.order: list[tuple[str, ...]] = []  # Paths in the order first entered.
    self._stack: list[str] = []

  @contextlib.contextmanager
  def phase(self, name: str):
    self._stack.append(name)
    path = tuple(self._stack)
    if path not in self.seconds:
      self.order.append(path)
      self.seconds[path], self.calls[path] = 0.0, 0
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[path] += time.perf_counter() - start
      self.calls[path] += 1
      self.peak_mib[path] = peak_rss_mib()
      self._stack.pop()

  def wrap(self, module: Any, attribute: str, name: str) -> Callable[[], None]:
    """Times every call of `module.attribute` as `name`; returns an undo function."""
    original = getattr(module, attribute)

    @functools.wraps(original)
    def timed(*args, **kwargs):
      with self.phase(name):
        return original(*args, **kwargs)

    setattr(module, attribute, timed)
    return lambda: setattr(module, attribute, original)


def run_phases(config, workdir: str) -> dict[str, Any]:
  """Runs `train.train_and_evaluate(config, workdir)` with every phase timed.

  Returns a JSON-able dict: "phases" {"a/b": seconds} in the order the phases
  began, "calls", "peak_mib" (VmHWM after each phase), "epochs" (metrics.jsonl
  records with images_per_s and data_wait_fraction), "total_s", "num_train",
  "batch_size", "num_database" and "map".
  """
  timer = PhaseTimer()
  undo = [
      timer.wrap(run_setup, "setup_run", "setup (data, splits, model, optimizer)"),
      timer.wrap(run_setup, "fresh_state", "init params and optimizer"),
      timer.wrap(targets_lib, "compute_targets", "pseudo labels"),
      timer.wrap(encoding, "encode_images", "encode images (network forward)"),
      timer.wrap(targets_lib, "make_pseudo_labels", "k-means and thresholds (Eqs. 1-2)"),
      timer.wrap(train, "run_epoch", "train epochs"),
      timer.wrap(checkpointing, "save", "checkpoint saves"),
      timer.wrap(retrieval.RetrievalEvaluator, "run",
                 "evaluation and validation (encode, rank, score)"),
      timer.wrap(ranking, "retrieval_metrics", "rank and score (ranking.py)"),
  ]
  try:
    with timer.phase("total"):
      results = train.train_and_evaluate(config, workdir)
  finally:
    for restore in undo:
      restore()
  records = io_utils.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  epochs = [r for r in records if "images_per_s" in r]
  name = lambda path: "/".join(path[1:]) or "total"
  return {
      "phases": {name(p): timer.seconds[p] for p in timer.order},
      "calls": {name(p): timer.calls[p] for p in timer.order},
      "peak_mib": {name(p): timer.peak_mib[p] for p in timer.order},
      "epochs": epochs,
      "total_s": timer.seconds[("total",)],
      "num_train": int(len(np.load(os.path.join(workdir, "splits", "train.npy")))),
      "batch_size": int(config.train.global_batch_size),
      "num_database": int(results["num_database"]),
      "map": {k: v for k, v in results.items()
              if k.startswith("map@") and isinstance(v, float)},
  }


def apply_overrides(config, overrides: list[str]):
  """KEY=VALUE pairs (e.g. train.num_epochs=2), values as Python literals."""
  flat = {}
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      flat[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      flat[key] = value
  config.update_from_flattened_dict(flat)
  return config


def data_wait_seconds(report: dict[str, Any]) -> list[float]:
  """Seconds each epoch's loop waited for the input pipeline (metrics.jsonl)."""
  steps = report["num_train"] // report["batch_size"]
  return [e["data_wait_fraction"] * steps * report["batch_size"] / e["images_per_s"]
          for e in report["epochs"]]


def print_phases(report: dict[str, Any]) -> None:
  """The phase table, children indented under their parent, and the data wait."""
  total = report["total_s"]
  rows = []
  for path, seconds in report["phases"].items():
    if path == "total":
      continue
    rows.append(("  " * path.count("/") + path.split("/")[-1], report["calls"][path],
                 seconds, 100.0 * seconds / total, report["peak_mib"][path]))
    if path == "train epochs":
      wait = sum(data_wait_seconds(report))
      rows.append(("  waiting for data (metrics.jsonl)", len(report["epochs"]), wait,
                   100.0 * wait / total, float("nan")))
  rows.append(("total", 1, total, 100.0, report["peak_mib"]["total"]))
  print_table(("phase", "calls", "seconds", "% of total", "VmHWM after (MiB)"), rows)
  print(f"\n{report['num_train']:,} training images, {report['num_database']:,} "
        f"database images; {report['map']}")
  epochs = report["epochs"]
  print("per epoch (metrics.jsonl; epoch 1 includes compiling the train step): " +
        "; ".join(f"epoch {e['epoch']}: {e['images_per_s']:.0f} img/s, data wait "
                  f"{100 * e['data_wait_fraction']:.1f} %" for e in epochs))
  epoch_seconds = report["phases"].get("train epochs", 0.0)
  if epoch_seconds:
    wait = sum(data_wait_seconds(report))
    print(f"time waiting for data: {100 * wait / epoch_seconds:.1f} % of the "
          f"training epochs, {100 * wait / total:.1f} % of the run")


def phase_benchmark(overrides: list[str]) -> dict[str, Any]:
  config = apply_overrides(repo_config("fashion_mnist"), overrides)
  print(f"\n## Phases of a real run: configs/fashion_mnist.py with "
        f"{' '.join(overrides) or 'no overrides'}\n", flush=True)
  with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
    report = run_phases(config, workdir)
  print_phases(report)
  return report


def define_flags() -> None:
  """The benchmark's flags (the module docstring has the commands)."""
  flags.DEFINE_string("models", "small_cnn,vgg16", "comma-separated step benchmarks")
  flags.DEFINE_integer("steps", 10, "timed small_cnn steps per round")
  flags.DEFINE_integer("vgg16-steps", 3,
                       "timed vgg16 steps per round (a step takes seconds)")
  flags.DEFINE_integer("rounds", 3, "rounds alternating the two frameworks")
  flags.DEFINE_integer("warmup", 2, "untimed steps before the rounds")
  flags.DEFINE_multi_string("override", None, "config override for the phase run, "
                            "KEY=VALUE, repeatable; default train.num_epochs=2")
  flags.DEFINE_bool("breakdown", False, "also time the parts of the step (convs, "
                    "dense layers, optimizer) alone in both frameworks")
  flags.DEFINE_bool("steps-only", False, "only the train-step benchmark")
  flags.DEFINE_bool("phases-only", False, "only the phases of a real run")
  flags.DEFINE_bool("methods", False, "only the train step of every method "
                    "(psch_jax.methods) on the same network and batch")
  flags.DEFINE_bool("loop", False, "only the training-loop benchmark: train.run_epoch "
                    "reading the metrics every step vs every 50 steps")
  flags.DEFINE_integer("loop-steps", 200, "steps per timed epoch of the loop benchmark")
  flags.DEFINE_string("loop-configs", "fashion_mnist:tiny,fashion_mnist",
                      "configs of the loop benchmark")
  flags.DEFINE_bool("quick", False,
                    "2 steps x 1 round, small_cnn only; tiny phase run")


def main(argv: Sequence[str]) -> None:
  del argv
  models, small_cnn_steps = FLAGS.models, FLAGS.steps
  rounds, warmup = FLAGS.rounds, FLAGS.warmup
  steps_only, phases_only = FLAGS["steps-only"].value, FLAGS["phases-only"].value
  overrides = FLAGS.override if FLAGS.override is not None else ["train.num_epochs=2"]
  if FLAGS.quick:
    models, small_cnn_steps, rounds, warmup = "small_cnn", 2, 1, 1
    if FLAGS.override is None:
      overrides = ["train.num_epochs=1", "data.train_per_class=50",
                   "data.num_database=2000", "data.num_validation=100",
                   "pseudo_labels.n_init=1",
                   # 500 training images allow at most 99 fine clusters (Eq. 2b).
                   "pseudo_labels.fine_clusters=20"]
  print(describe_machine(("jax", "jaxlib", "flax", "optax", "torch", "numpy")))
  if FLAGS.methods:
    method_benchmark(models.split(","), rounds=rounds, warmup=warmup,
                     steps={"small_cnn": small_cnn_steps,
                            "vgg16": FLAGS["vgg16-steps"].value})
    return
  if FLAGS.loop:
    loop_steps, loop_configs = FLAGS["loop-steps"].value, FLAGS["loop-configs"].value
    if FLAGS.quick:
      loop_steps, rounds, loop_configs = 20, 1, "fashion_mnist:tiny"
    loop_benchmark(loop_configs.split(","), steps=loop_steps, rounds=rounds)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    return
  if not phases_only:
    steps = {"small_cnn": small_cnn_steps, "vgg16": FLAGS["vgg16-steps"].value}
    step_benchmark(models.split(","), steps=steps, rounds=rounds,
                   warmup=warmup)
    if FLAGS.breakdown:
      breakdown_benchmark(models.split(","), steps=steps, warmup=warmup)
  if not steps_only:
    if not phases_only:
      print("\n(VmHWM below includes the step benchmarks run earlier in this process; "
            "--phases-only gives the run's own peak.)")
    phase_benchmark(overrides)
  load = os.getloadavg()
  print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_train")
