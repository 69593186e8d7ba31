"""What a :class:`~seqnorm_jax.train.TrainConfig` builds: its model and its data sources."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from seqnorm_jax.train.config import TrainConfig

__all__ = ["build_model", "load_sources", "source_num_classes"]


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``seqnorm_jax.models.get_model`` for ``config`` (model, norm, dtype, model_kwargs)."""
    from seqnorm_jax.models import get_model

    return get_model(config.model, norm=config.norm, num_classes=num_classes,
                     dtype=_dtype(config.dtype), **config.model_kwargs)


def load_sources(config: TrainConfig):
    """The training and evaluation sources of ``config`` (via ``seqnorm_jax.data.load``).

    With ``validation_size`` the evaluation source is the held-out part of the training
    set (``"validation"``) and training uses the rest (``"train_minus_val"``); otherwise
    the training source is ``"train"`` and the evaluation one ``config.eval_split``.
    ``train_size`` then keeps a stratified random subset of the training source
    (``seqnorm_jax.data.stratified_holdout``, seeded by ``seed``).

    Raises:
      seqnorm_jax.data.DatasetNotFoundError: the dataset is not available locally.
    """
    from seqnorm_jax import data

    common = dict(data_dir=config.data_dir, source=config.data_source, seed=config.seed)
    if config.validation_size:
        common["validation_size"] = config.validation_size
        train = data.load(config.dataset, "train_minus_val", **common)
        evaluation = data.load(config.dataset, "validation", **common)
    else:
        train = data.load(config.dataset, "train", **common)
        evaluation = data.load(config.dataset, config.eval_split, **common)
    if config.train_size and config.train_size != len(train):
        if config.train_size > len(train):
            raise ValueError(f"train_size={config.train_size} is larger than the training set "
                             f"({len(train)} examples); use at most {len(train)} or leave it "
                             "unset.")
        train = data.SubsetSource(
            train, data.stratified_holdout(train.labels, config.train_size, config.seed))
    return train, evaluation


def source_num_classes(source) -> int:
    info = getattr(source, "info", None)
    if info is None or not hasattr(info, "num_classes"):
        raise ValueError("the data source has no .info.num_classes; pass num_classes to Trainer.")
    return int(info.num_classes)
