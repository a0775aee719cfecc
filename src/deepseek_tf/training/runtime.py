"""Runtime set-up: threads, devices and the distribution strategy, logged at start."""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.config.schema import RuntimeConfig
from deepseek_tf.errors import ConfigError


def configure_threads(r: RuntimeConfig) -> None:
    """Sets oneDNN/TF thread pools; must run before TensorFlow executes any op."""
    try:
        if r.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(r.intra_op_threads)
        if r.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(r.inter_op_threads)
    except RuntimeError as e:  # TF already initialised: keep going, but say so
        print(f"[runtime] thread settings not applied: {e}")


def make_strategy(r: RuntimeConfig) -> tf.distribute.Strategy:
    """`auto`: mirrored over several listed/visible GPUs, else the default strategy."""
    devices = list(r.devices)
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if r.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(devices or None)
    if r.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else (gpus or ["/cpu:0"])[0])
    if r.strategy == "auto":
        if len(devices) > 1 or (not devices and len(gpus) > 1):
            return tf.distribute.MirroredStrategy(devices or None)
        if devices:
            return tf.distribute.OneDeviceStrategy(devices[0])
        return tf.distribute.get_strategy()
    raise ConfigError(f"runtime.strategy: unknown strategy {r.strategy!r}")


def describe_runtime(r: RuntimeConfig, strategy: tf.distribute.Strategy) -> dict:
    """What is actually in use, for the start-of-run log line."""
    return {
        "tensorflow": tf.__version__,
        "jit_compile": r.jit_compile,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
    }
