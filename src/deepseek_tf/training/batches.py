"""A training run's data: its training batches (one pipeline, or one per replica of a
distribution strategy) and its validation split."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.config.schema import Config
from deepseek_tf.config.stages import parse_stages, stage_at
from deepseek_tf.data.pipeline import make_eval_dataset, make_step_dataset
from deepseek_tf.tokenizers.base import Tokenizer


def staged_batches(config: Config, tokenizer: Tokenizer, strategy, start_step=0, log=None):
    """`train_batches` over `train.stages` (progressive training): each stage's batches,
    of its own shape, for its steps, from step `start_step` on; without stages, the run's
    one pipeline. A stage's pipeline starts where the run stands (a later stage reads
    past the blocks the steps before it used, in its own block length) and is built
    when the run reaches it."""
    stages = parse_stages(config.train, config.data, config.model.max_seq_len)
    if not stages:
        return train_batches(config, tokenizer, strategy, start_step, log)

    def chained():
        for stage in stages:
            if stage.last <= start_step:
                continue
            first = max(start_step, stage.first)
            shaped = update_config(
                config,
                data={"seq_len": stage.seq_len},
                train={"batch_size": stage.batch_size, "stages": ()},
            )
            if log is not None:
                log(
                    f"[stage] steps {first + 1}-{stage.last}: batch {stage.batch_size} x "
                    f"{stage.seq_len} tokens"
                )
            yield from itertools.islice(
                train_batches(shaped, tokenizer, strategy, first, log), stage.last - first
            )

    return chained()


def tokens_per_step(config: Config, stages, step: int) -> int:
    """Tokens the optimizer step after `step` steps trains on, with `stages` the run's
    parsed `train.stages` (`config.stages.parse_stages`; empty: none)."""
    t, seq_len, batch_size = config.train, config.data.seq_len, config.train.batch_size
    stage = stage_at(stages, step)
    if stage is not None:
        seq_len, batch_size = stage.seq_len, stage.batch_size
    return batch_size * t.gradient_accumulation_steps * seq_len


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
