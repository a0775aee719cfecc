"""Runtime set-up: threads, devices and the distribution strategy, logged at start."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from deepseek_tf.config.schema import RuntimeConfig
from deepseek_tf.errors import ConfigError

# What a collective raises when a peer worker is gone (timed out or aborted): the job
# cannot continue, every worker restarts with --resume.
LOST_WORKER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


def configure_threads(r: RuntimeConfig) -> None:
    """Sets oneDNN/TF thread pools; must run before TensorFlow executes any op."""
    try:
        if r.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(r.intra_op_threads)
        if r.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(r.inter_op_threads)
    except RuntimeError as e:  # TF already initialised: keep going, but say so
        print(f"[runtime] thread settings not applied: {e}")


def check_tf_config() -> dict:
    """The parsed `TF_CONFIG` of a multi-worker job, or a one-line ConfigError."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "runtime.strategy=multi_worker needs TF_CONFIG (cluster.worker addresses and task "
            "type/index) in the environment"
        )
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"]["worker"]
        task = tf_config["task"]
        index = int(task["index"])
        if task["type"] not in tf_config["cluster"] or not workers:
            raise ValueError(f"task type {task['type']!r} is not in the cluster")
        if task["type"] == "worker" and not 0 <= index < len(workers):
            raise ValueError(f"task index {index} out of range for {len(workers)} workers")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"TF_CONFIG is malformed ({type(e).__name__}: {e})") from None
    return tf_config


def make_tpu_strategy(tpu: str = "") -> tf.distribute.Strategy:
    """TPUStrategy on the TPU named by `tpu` ('' = the local/env-configured one)."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"runtime.strategy=tpu: no TPU to connect to ({first})") from None
    return tf.distribute.TPUStrategy(resolver)


def check_devices(r: RuntimeConfig) -> list[str]:
    """`runtime.devices`, each a device TensorFlow parses and this machine has."""
    available = {d.name.lower(): d.name for d in tf.config.list_logical_devices()}
    names = []
    for i, device in enumerate(r.devices):
        try:
            spec = tf.DeviceSpec.from_string(device)
        except (ValueError, TypeError):
            raise ConfigError(
                f"runtime.devices[{i}]: {device!r} is not a device name (e.g. /cpu:0, /gpu:1)"
            ) from None
        if spec.device_type is None:
            raise ConfigError(f"runtime.devices[{i}]: {device!r} names no device type")
        index = spec.device_index or 0
        full = f"/device:{spec.device_type.upper()}:{index}".lower()
        if full not in available:
            raise ConfigError(
                f"runtime.devices[{i}]: {device!r} is not on this machine (it has "
                f"{', '.join(sorted(available.values()))})"
            )
        names.append(available[full])
    return names


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker job."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return bool(strategy.extended._in_multi_worker_mode())  # noqa: SLF001


def make_strategy(r: RuntimeConfig) -> tf.distribute.Strategy:
    """`auto`: mirrored over several listed/visible GPUs, else the default strategy.

    `multi_worker` reads TF_CONFIG and must be created before TensorFlow runs
    any op in this process; `tpu` connects to the TPU cluster.
    """
    if r.strategy == "multi_worker":
        check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if r.strategy == "tpu":
        return make_tpu_strategy()
    devices = check_devices(r)
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
    info = {
        "tensorflow": tf.__version__,
        "jit_compile": r.jit_compile,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
    }
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type:
        cluster = resolver.cluster_spec().as_dict()
        info["task"] = f"{resolver.task_type}:{resolver.task_id}"
        info["workers"] = sum(len(v) for v in cluster.values())
        info["chief"] = is_chief(strategy)
    return info
