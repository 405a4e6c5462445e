"""What the loss regresses onto: pseudo labels and similarity sources of the training
set, and the target matrix of a batch built from them.

The training set's targets (a dict of arrays, one row per training image; the
checkpoint holds it, so a resumed run never recomputes k-means differently):

| key                 | dtype, shape      | what                                          |
|---------------------|-------------------|-----------------------------------------------|
| "pseudo_labels"     | int32 (N,)        | y of Eq. 2, -1 = unlabelled                   |
| "cluster_affinity"  | f32 (K_c, K_c)    | r of Eq. 7b                                   |
| "fine_labels"       | int32 (N,)        | y^f of Eq. 2b, `pseudo_labels.fine_clusters` set |
| "part_descriptors"  | f32 (N, P, C/P)   | v of Eq. 4, `similarity.source = "initial"`   |
| "part_weights"      | f32 (N, P)        | omega of Eq. 5, `similarity.source = "initial"` |
| "pixel_features"    | f32 (N, H W C)    | unit pixels of Eq. 6b, `similarity.source = "pixels"` |

`similarity.source` says where the soft similarity s of a pair comes from:
"initial" (the part features of the network before training, Eq. 6, kept for the
whole run), "pixels" (Eq. 6b) or "online" (the part features of the batch's own
feature maps at this step, nothing stored). Only this module branches on it.

- `compute_targets`: the targets of the training set at an epoch (Eqs. 1, 1a, 2, and
  the stored similarity source), with statistics of the pseudo labelling;
- `abstract_targets`: their shapes and dtypes, to restore a checkpoint into;
- `batch_targets`: s, S and m of a batch (Eqs. 6 / 6b, 7 / 7b), shared by the train
  step and `psch_jax.diagnostics`.
"""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from psch_jax import config_schema
from psch_jax import encoding
from psch_jax import models
from psch_jax import spectral
from psch_jax.attention import GroupedAttention
from psch_jax.pseudo_labels import pseudo_labels as make_pseudo_labels
from psch_jax.pseudo_labels import cluster_affinity, purity
from psch_jax.similarity import pixel_similarity, soft_similarity, target_similarity

# What k-means clusters (`pseudo_labels.features`; "global" after a refresh), as the
# encoder output it reads; the pixel-based ones read the images themselves.
_ENCODED_FEATURES = {"global": "global_feature", "pooled": "pooled_feature"}
_PIXEL_FEATURES = ("pixels", "spectral")
_PART_KEYS = ("part_descriptors", "part_weights")


def unit_rows(rows: np.ndarray) -> np.ndarray:
  """float32 (N, D) rows scaled to unit L2 norm (zero rows stay zero)."""
  rows = np.asarray(rows, np.float32)
  return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def compute_targets(config: ml_collections.ConfigDict, key: jax.Array, encode, params,
                    source, train_indices: np.ndarray, *, mesh: Mesh, epoch: int,
                    features: str, similarity_from: Optional[dict] = None
                    ) -> tuple[dict, dict]:
  """Pseudo labels (Eq. 2) for the training images, and the similarity source they
  are compared by (Eqs. 4-5 or 6b) unless it is computed online.

  Args:
    key: the PRNG key of this pseudo labelling (spectral embedding and k-means).
    encode: `encoding.make_encoder`'s function; `params` its network params.
    mesh: the run's mesh. K-means runs on this process's part of it
      (`mesh.local_mesh`): every process holds all N feature rows and clusters them
      itself, with no collective across hosts, so every process gets the same
      labels without exchanging them.
    epoch: recorded in the statistics.
    features: what k-means clusters: "global", "pooled", "pixels" or "spectral"
      (the k-NN graph embedding of the pixels, Eq. 1a).
    similarity_from: previous targets whose part features are kept (the frozen
      initial network's); None computes them from `params`.

  Returns:
    targets: the dict of the module docstring, numpy arrays;
    stats: JSON-able statistics of this pseudo labelling.
  """
  source_kind = config.similarity.source
  need_parts = source_kind == "initial" and similarity_from is None
  keys = [_ENCODED_FEATURES[features]] if features in _ENCODED_FEATURES else []
  if need_parts:
    keys += list(_PART_KEYS)
  encoded = (encoding.encode_images(encode, params, source, train_indices,
                                    batch_size=config.eval.batch_size, mesh=mesh,
                                    keys=keys)
             if keys else {})
  pixels = None
  if features in _PIXEL_FEATURES or source_kind == "pixels":
    pixels = source.read(train_indices).reshape(len(train_indices), -1)
    pixels = pixels.astype(np.float32) / 255.0
  z = pixels if features in _PIXEL_FEATURES else encoded[keys[0]]
  p = config.pseudo_labels
  # The k-NN graph of Eq. 1a, built once for both levels; None clusters z itself.
  # (The sizes were checked against the training split by
  # `config_schema.check_against_data`.)
  neighbors = (np.asarray(spectral.knn_graph(jnp.asarray(z),
                                             num_neighbors=p.spectral_neighbors))
               if features == "spectral" else None)
  labels, stats, embedding = _cluster(
      config, key, z, neighbors, num_clusters=p.num_clusters,
      num_components=config_schema.spectral_components(config), mesh=mesh)
  labels = np.asarray(labels, np.int32)
  targets = {"pseudo_labels": labels,
             "cluster_affinity": np.asarray(cluster_affinity(stats.centroids))}
  if source_kind == "initial":
    parts_from = similarity_from if similarity_from is not None else encoded
    targets.update({k: np.asarray(parts_from[k]) for k in _PART_KEYS})
  elif source_kind == "pixels":
    targets["pixel_features"] = unit_rows(pixels)
  summary = {"epoch": epoch, "features": features,
             "kept_fraction": float(stats.kept_fraction),
             "kept_fraction_per_cluster": np.asarray(
                 stats.kept_fraction_per_cluster).round(4).tolist(),
             "cluster_sizes": np.asarray(stats.cluster_sizes).tolist(),
             "inertia": float(stats.inertia),
             "kmeans_iterations": int(stats.num_iterations),
             "purity": float(purity(labels, source.labels[train_indices])),
             **stats.sanity()}
  if embedding is not None:
    summary["spectral"] = embedding.stats()
  if p.fine_clusters is not None:
    # A key of its own, so that the coarse labels are those of a one-level run.
    fine_labels, fine_stats, fine_embedding = _cluster(
        config, jax.random.fold_in(key, 1), z, neighbors,
        num_clusters=p.fine_clusters, num_components=p.fine_clusters, mesh=mesh)
    targets["fine_labels"] = np.asarray(fine_labels, np.int32)
    summary["fine"] = {
        "num_clusters": p.fine_clusters,
        "kept_fraction": float(fine_stats.kept_fraction),
        "cluster_sizes": np.asarray(fine_stats.cluster_sizes).tolist(),
        "purity": float(purity(targets["fine_labels"],
                               source.labels[train_indices])),
        **fine_stats.sanity()}
    if fine_embedding is not None:
      summary["fine"]["spectral"] = fine_embedding.stats()
  return targets, summary


def _cluster(config, key, z, neighbors: Optional[np.ndarray], *, num_clusters: int,
             num_components: int, mesh: Mesh):
  """k-means labels (Eqs. 1, 2) of one level: on the spectral embedding (Eq. 1a) of
  the k-NN graph `neighbors` (int (N, k), `spectral.knn_graph` of z) when given,
  else on the features z (N, D) directly.

  Returns:
    (labels (N,) int32 with -1 for rejected images, PseudoLabelStats, the
    SpectralEmbedding or None).
  """
  p = config.pseudo_labels
  embedding = None
  if neighbors is not None:
    embedding_key, key = jax.random.split(key)
    embedding = spectral.graph_embedding(embedding_key, neighbors,
                                         num_components=num_components)
    z = embedding.embedding
  labels, stats = make_pseudo_labels(
      key, jnp.asarray(z), num_clusters=num_clusters, keep_quantile=p.keep_quantile,
      absolute_threshold=p.absolute_threshold, n_init=p.n_init, max_iter=p.max_iter,
      tol=p.tol, mesh=mesh.local_mesh)
  return labels, stats, embedding


def abstract_targets(config: ml_collections.ConfigDict, num_train: int,
                     model: models.PSCHNet, sharding, *, pixel_dim: int = 0,
                     attention: Optional[GroupedAttention] = None) -> dict:
  """`jax.ShapeDtypeStruct`s of `compute_targets`' targets, placed by `sharding`
  (None: no placement), without computing anything.

  Args:
    pixel_dim: H W C of the stored images (the "pixels" source only).
    attention: the run's `encoding.make_attention(config)`; built from the config
      when None.
  """
  num_clusters = config.pseudo_labels.num_clusters
  struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  targets = {"pseudo_labels": struct((num_train,), jnp.int32),
             "cluster_affinity": struct((num_clusters, num_clusters), jnp.float32)}
  if config.pseudo_labels.fine_clusters is not None:
    targets["fine_labels"] = struct((num_train,), jnp.int32)
  if config.similarity.source == "initial":
    shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    attention = encoding.make_attention(config) if attention is None else attention
    parts = jax.eval_shape(
        lambda: attention.apply({}, model.init_with_output(
            jax.random.key(0), jnp.zeros(shape), train=False)[0]["feature_map"]))
    targets["part_descriptors"] = struct((num_train,) + parts.descriptors.shape[1:],
                                         jnp.float32)
    targets["part_weights"] = struct((num_train,) + parts.weights.shape[1:],
                                     jnp.float32)
  elif config.similarity.source == "pixels":
    targets["pixel_features"] = struct((num_train, pixel_dim), jnp.float32)
  return targets


class BatchTargets(NamedTuple):
  """What the loss of a batch of B training images regresses onto.

  Attributes:
    pseudo_labels: int32 (B,) y of the batch, -1 = unlabelled (Eq. 2).
    similarity: f32 (B, B) soft similarity s (Eq. 6, or 6b for pixels).
    target: f32 (B, B) target similarity S (Eq. 7, 7b with a cross-cluster ceiling).
    pair_weight: f32 (B, B) pair weights m (Eq. 7).
    fine_labels: int32 (B,) y^f of the batch (Eq. 2b), or None for one level.
  """
  pseudo_labels: jax.Array
  similarity: jax.Array
  target: jax.Array
  pair_weight: jax.Array
  fine_labels: Optional[jax.Array] = None


def batch_targets(config: ml_collections.ConfigDict, targets: dict,
                  rows: Optional[jax.Array] = None, *,
                  online_parts: Optional[Callable[[], tuple]] = None) -> BatchTargets:
  """s, S and m of a batch of training images, from the training set's targets.

  Args:
    targets: `compute_targets`' dict (arrays, on device or host).
    rows: int (B,) positions of the batch's images in the training set; None takes
      every training image in order.
    online_parts: for `similarity.source = "online"` only, and only then called:
      () -> (descriptors (B, P, C/P), weights (B, P)) of the batch's own images at
      this step, without gradient (Eqs. 4-5).

  Returns:
    `BatchTargets`.
  """
  take = (lambda x: x) if rows is None else (lambda x: x[rows])
  sim = config.similarity
  labels = take(targets["pseudo_labels"])
  fine_labels = take(targets["fine_labels"]) if "fine_labels" in targets else None
  if sim.source == "pixels":
    soft = pixel_similarity(take(targets["pixel_features"]))
  elif sim.source == "online":
    soft = soft_similarity(*online_parts())
  else:
    soft = soft_similarity(take(targets["part_descriptors"]),
                           take(targets["part_weights"]))
  target, pair_weight = target_similarity(
      soft, labels, same_class_floor=sim.same_class_floor,
      unlabelled_weight=sim.unlabelled_weight, hard=sim.hard,
      cross_cluster_ceiling=sim.cross_cluster_ceiling,
      cluster_affinity=targets["cluster_affinity"],
      fine_labels=fine_labels, sibling_target=sim.sibling_target)
  return BatchTargets(pseudo_labels=labels, similarity=soft, target=target,
                      pair_weight=pair_weight, fine_labels=fine_labels)


def online_parts_of(config: ml_collections.ConfigDict, encode, params, source,
                    train_indices: np.ndarray, *, mesh: Mesh
                    ) -> Callable[[], tuple[jax.Array, jax.Array]]:
  """`batch_targets`' online_parts for the whole training set outside a train step:
  the part features of `params` on the unaugmented images, encoded when called."""

  def parts():
    encoded = encoding.encode_images(encode, params, source, train_indices,
                                     batch_size=config.eval.batch_size, mesh=mesh,
                                     keys=_PART_KEYS)
    return tuple(jnp.asarray(encoded[k]) for k in _PART_KEYS)

  return parts
