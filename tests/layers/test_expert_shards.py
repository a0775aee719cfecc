"""`DeepSeekMoE.shard_experts`: routed experts as per-replica shards (expert parallelism).

Two logical CPU devices under `MirroredStrategy`, in a subprocess (logical devices must
be set before TensorFlow starts): the sharded layer inside `strategy.run` equals the
whole layer on the whole batch, outputs and gradients, and it checkpoints as the whole
layer (each stack saved whole, restored into a layer that was never sharded).
"""

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys, tempfile
import keras
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from deepseek_tf.layers.moe import DeepSeekMoE

kw = dict(d_model=8, moe_hidden_dim=16, n_routed_experts=4, n_shared_experts=1,
          num_experts_per_tok=2, seq_aux_loss_alpha=0.01)
keras.utils.set_random_seed(0)
x = np.random.RandomState(0).randn(4, 8, 8).astype("float32")  # (B, T, d), 2 per replica
plain = DeepSeekMoE(**kw)
plain.build((None, None, 8))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    sharded = DeepSeekMoE(**kw)
    sharded.build((None, None, 8))
    sharded.set_weights(plain.get_weights())
    shards = sharded.shard_experts(2)
result = {"shard_shape": list(shards[0].shape), "sharded": sharded.experts_sharded}
result["whole_read"] = float(np.abs(sharded.expert_stack("experts_gate")
                                    - plain.expert_stack("experts_gate")).max())

with tf.GradientTape() as tape:  # the reference: the whole layer on the whole batch
    tape.watch(plain.experts_gate.value)
    y_ref = plain(x)["x"]
    loss = tf.reduce_sum(y_ref * y_ref)
g_ref = tape.gradient(loss, plain.experts_gate.value)  # (4, 8, 16)


@tf.function
def step(xs):
    def replica_fn(xb):
        with tf.GradientTape() as tape:
            tape.watch(shards[0].value)
            y = sharded(xb)["x"]
            loss = tf.reduce_sum(y * y)  # each replica's share of the same sum
        return y, tape.gradient(loss, shards[0].value)
    return strategy.run(replica_fn, args=(xs,))


xs = strategy.experimental_distribute_values_from_function(
    lambda ctx: x[2 * ctx.replica_id_in_sync_group : 2 * ctx.replica_id_in_sync_group + 2])
ys, gs = step(xs)
y = np.concatenate([t.numpy() for t in strategy.experimental_local_results(ys)])
g = np.concatenate([t.numpy() for t in strategy.experimental_local_results(gs)])
result["out_diff"] = float(np.abs(y - y_ref.numpy()).max())
result["grad_diff"] = float(np.abs(g - g_ref.numpy()).max())  # shard r: experts 2r, 2r + 1

prefix = tf.train.Checkpoint(layer=sharded).write(tempfile.mkdtemp() + "/ckpt")
fresh = DeepSeekMoE(**kw)
fresh.build((None, None, 8))
tf.train.Checkpoint(layer=fresh).read(prefix).assert_existing_objects_matched()
result["restored_diff"] = max(float(np.abs(a - b).max())
                              for a, b in zip(fresh.get_weights(), plain.get_weights()))
print("RESULT", json.dumps(result))
"""


def test_sharded_layer_equals_the_whole_layer_and_saves_whole():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ")[1].splitlines()[0])
    assert result["sharded"] and result["shard_shape"] == [2, 8, 16]  # 4 experts / 2
    assert result["whole_read"] == 0.0  # outside strategy.run: the whole stacks
    assert result["out_diff"] < 1e-5
    assert result["grad_diff"] < 1e-5  # each shard's gradient covers the whole batch
    assert result["restored_diff"] == 0.0
