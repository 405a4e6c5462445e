"""PSCH as a method of the harness: pseudo labels and soft multi-part similarity
targets (`psch_jax.targets`), and the loss of Eqs. 8-11 (`psch_jax.loss`)."""
import jax
import jax.numpy as jnp
import ml_collections

from psch_jax import targets as targets_lib
from psch_jax.loss import psch_loss
from psch_jax.methods.interface import Method, TrainingData


def _epoch_targets(config: ml_collections.ConfigDict, key: jax.Array,
                   data: TrainingData, params, *, epoch: int, previous=None
                   ) -> tuple[dict, dict]:
  """At epoch 0 k-means on `pseudo_labels.features` of the fresh network; at a
  refresh on the global features of `params`, keeping the similarity source of
  `previous` (`targets.compute_targets`)."""
  features = config.pseudo_labels.features if previous is None else "global"
  return targets_lib.compute_targets(
      config, key, data.encode, params, data.source, data.train_indices,
      mesh=data.mesh, epoch=epoch, features=features, similarity_from=previous)


def _refresh_due(config: ml_collections.ConfigDict, epoch: int) -> bool:
  refresh = config.pseudo_labels.refresh_every_epochs
  return bool(epoch > 0 and refresh and epoch % refresh == 0)


def _classifier_outputs(config: ml_collections.ConfigDict) -> int:
  """K_c, or K_c + K_f with fine clusters: one linear layer holds both classifiers
  of Eq. 9b, the first K_c logits the pseudo classes', the rest the fine clusters'."""
  p = config.pseudo_labels
  return p.num_clusters + (p.fine_clusters or 0)


def _loss(config: ml_collections.ConfigDict, outputs: list[dict], targets: dict,
          position: jax.Array, *, key: jax.Array, attention) -> tuple[jax.Array, dict]:
  """Eq. 11 (11b with fine clusters) on the batch's targets (Eqs. 6-7c); `key` is
  unused (PSCH draws nothing in its loss)."""
  del key
  out, = outputs
  online_parts = lambda: attention.apply(
      {}, jax.lax.stop_gradient(out["feature_map"]))[:2]
  batch_target = targets_lib.batch_targets(config, targets, position,
                                           online_parts=online_parts)
  logits, fine_logits = out["class_logits"], None
  if batch_target.fine_labels is not None:
    num_coarse = config.pseudo_labels.num_clusters
    logits, fine_logits = logits[:, :num_coarse], logits[:, num_coarse:]
  total, terms = psch_loss(
      out["relaxed_codes"], logits, batch_target.pseudo_labels, batch_target.target,
      batch_target.pair_weight, alpha=config.loss.alpha, beta=config.loss.beta,
      fine_logits=fine_logits, fine_labels=batch_target.fine_labels,
      fine_alpha=config.loss.fine_alpha)
  metrics = {f"loss_{k}": v for k, v in terms.items()}
  metrics["labelled_fraction"] = jnp.mean(targets["pseudo_labels"][position] >= 0)
  return total, metrics


def _describe(stats: dict) -> str:
  return (f"pseudo labels: kept {stats['kept_fraction']:.3f}, purity "
          f"{stats['purity']:.3f} (diagnostic only)")


METHOD = Method(
    name="psch", num_views=1, view_augmentation=lambda config: config.data.augment,
    classifier_outputs=_classifier_outputs, epoch_targets=_epoch_targets,
    refresh_due=_refresh_due,
    abstract_targets=lambda config, num_train, model, sharding, *, pixel_dim,
    attention: targets_lib.abstract_targets(config, num_train, model, sharding,
                                            pixel_dim=pixel_dim, attention=attention),
    loss=_loss, describe=_describe, log_key="pseudo_labels")
