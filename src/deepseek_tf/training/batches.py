"""A training run's data: its training batches (one pipeline, or one per replica of a
distribution strategy) and its validation split."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from deepseek_tf.config.schema import Config
from deepseek_tf.data.pipeline import make_eval_dataset, make_step_dataset
from deepseek_tf.tokenizers.base import Tokenizer


def train_batches(
    config: Config,
    tokenizer: Tokenizer,
    strategy: tf.distribute.Strategy,
    start_step: int = 0,
    log: Callable[[str], None] | None = None,
):
    """The iterator of training batches from step `start_step` on.

    Args:
        config: the run's config (`data`, `train.batch_size`, accumulation).
        tokenizer: the run's tokenizer.
        strategy: the distribution strategy; several replicas get per-replica batches.
        start_step: steps already taken (a resumed run continues where it stopped).
        log: printer of the per-replica batch line (several replicas), or None.

    Returns:
        An iterator of `(inputs, targets, weights)`: `(B, T)` or `(A, B, T)` global
        batches, or their per-replica shares distributed over `strategy`.
    """
    t = config.train
    accumulation = t.gradient_accumulation_steps
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:  # the default path: one pipeline, the global batch
        ds = make_step_dataset(
            config.data, tokenizer, t.batch_size, accumulation=accumulation, start_step=start_step
        )
        return iter(ds)

    def dataset_fn(context: tf.distribute.InputContext):
        # Each worker builds its own pipeline over its shard of the blocks, batched
        # per replica; a pipeline feeding R local replicas yields R batches a step.
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        return make_step_dataset(
            config.data,
            tokenizer,
            context.get_per_replica_batch_size(t.batch_size),
            accumulation=accumulation,
            start_step=start_step * local_replicas,
            num_shards=context.num_input_pipelines,
            shard_index=context.input_pipeline_id,
        )  # (B/R, T) or (A, B/R, T)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    if log is not None:
        log(f"[data] {t.batch_size // replicas} sequences per replica per micro-batch")
    return iter(strategy.distribute_datasets_from_function(dataset_fn, options))


def validation_batches(config: Config, tokenizer: Tokenizer) -> tf.data.Dataset:
    """The validation split in `train.batch_size` batches (`make_eval_dataset`)."""
    return make_eval_dataset(config.data, tokenizer, config.train.batch_size, split="val")
