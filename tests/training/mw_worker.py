"""A worker process for tests/training/test_multi_worker.py.

Runs `deepseek-tf train` (the CLI's own `main`) with the given arguments. Test-only hooks,
set through the environment:

- DEEPSEEK_TF_TEST_WEIGHTS=FILE: save this process's final model weights to FILE (.npz),
  so the test can compare the workers' weights.
- DEEPSEEK_TF_TEST_REFERENCE_SHARDS=N: a single-process reference run whose global batch
  k is the concatenation of batch k of the N shards (`num_shards=N`, batch_size / N each),
  i.e. exactly the sequences that N single-replica workers see together at step k.
"""

import os
import sys

import numpy as np
import tensorflow as tf

from deepseek_tf.cli.main import main
from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.training import trainer


def _dumping_train(train):
    def wrapped(self):
        summary = train(self)
        path = os.environ.get("DEEPSEEK_TF_TEST_WEIGHTS")
        if path:
            np.savez(path, *[np.asarray(v.numpy()) for v in self.model.weights])
        return summary

    return wrapped


def _sharded_reference_iterator(self):
    shards = int(os.environ["DEEPSEEK_TF_TEST_REFERENCE_SHARDS"])
    t = self.config.train
    assert t.gradient_accumulation_steps == 1 and self.replicas == 1
    parts = tuple(
        make_train_dataset(
            self.config.data,
            self.tokenizer,
            t.batch_size // shards,
            start_batch=self.start_step,
            num_shards=shards,
            shard_index=i,
        )
        for i in range(shards)
    )
    ds = tf.data.Dataset.zip(parts).map(
        lambda *batches: tuple(tf.concat(xs, axis=0) for xs in zip(*batches))
    )
    return iter(ds)


if __name__ == "__main__":
    trainer.Trainer.train = _dumping_train(trainer.Trainer.train)
    if os.environ.get("DEEPSEEK_TF_TEST_REFERENCE_SHARDS"):
        trainer.Trainer.train_batches = _sharded_reference_iterator
    sys.exit(main(sys.argv[1:]))
