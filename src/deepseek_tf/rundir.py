"""Opening a run directory: `RunDir` and `load_run`, the library's one way to open a run.

The directory's files (names, atomic writes, metrics, history, checkpoints) are laid out
by `deepseek_tf.run_layout`; `RunDir` is that layout plus loading the model. Loading
builds the model without running its initialisers (`layers.deferred_init`) and restores
the run's weights -- the best validation's with `train.keep_best`, else the newest
readable checkpoint (`RunLayout.weights_checkpoint` decides) -- one variable at a time
(`training.restore`), so a run is loaded with about one copy of its weights in memory.

Examples:

>>> from deepseek_tf.rundir import load_run  # doctest: +SKIP
>>> model, tokenizer = load_run("runs/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from deepseek_tf.config.schema import Config
from deepseek_tf.layers.deferred_init import initializers_skipped
from deepseek_tf.models.builder import build_model, inference_dtype
from deepseek_tf.models.footprint import check_fits
from deepseek_tf.run_layout import (
    BEST_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    HF_SOURCE_CONFIG,
    HISTORY_FILE,
    LOG_DIR,
    METRICS_FILE,
    MetricsLog,
    NoMetrics,
    RunLayout,
    atomic_write_text,
)
from deepseek_tf.training.restore import checkpoint_variables, restore_weights

__all__ = [
    "BEST_DIR",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "HF_SOURCE_CONFIG",
    "HISTORY_FILE",
    "LOG_DIR",
    "METRICS_FILE",
    "MetricsLog",
    "NoMetrics",
    "RunDir",
    "atomic_write_text",
    "load_run",
]


class RunDir(RunLayout):
    """A run directory: its files (`RunLayout`) and its model.

    Args:
        path: the directory.

    Examples:
    >>> run = RunDir("runs/tiny")  # doctest: +SKIP
    >>> run.read_config().model.d_model, run.read_history()  # doctest: +SKIP
    (32, [])
    """

    def load(self, config: Config | None = None):
        """`(model, tokenizer)` with the run's weights (`RunLayout.weights_checkpoint`: the
        best validation's with `train.keep_best`, else the latest readable), the model in
        the run's inference dtype (`model.dtype`, or `train.precision` when that is empty).

        The tokenizer is None for a run that has none (e.g. a converted checkpoint whose
        source shipped no `tokenizer.json`); the model then takes token ids.

        Args:
            config: the run's config (default: its `config.yaml`).

        Raises:
            RunDirError: no config, no readable checkpoint, or one that does not fit.
        """
        config = config or self.read_config()
        tokenizer = self.read_tokenizer(required=False)
        # the checkpoint overwrites every weight (a quantized structure is built without
        # reading the float ones: `models.quantization.apply_quantized_structure`)
        with initializers_skipped() as skipped:
            # the config's vocab_size (may exceed the tokenizer's)
            model = build_model(config, dtype=inference_dtype(config))
        checkpoint = self.weights_checkpoint(model, config)
        restore_weights(checkpoint)
        skipped.run_except(model, checkpoint_variables(checkpoint.checkpoint))
        return model, tokenizer


def load_run(run_dir):
    """Loads a run directory: `(model, tokenizer)` with its weights (the best validation's
    with `train.keep_best`, else its latest readable ones), after checking that the model
    fits this machine's memory (a one-line error otherwise).

    The library's one way to open a run (`deepseek_tf.load` re-exports it). The tokenizer
    is None for a run that has none; the model then takes token ids.

    Args:
        run_dir: the run directory.

    Raises:
        RunDirError: not a run, or no readable checkpoint that fits its model.
        ConfigError: the model needs more memory than this machine has.
    """
    run = RunDir(run_dir)
    config = run.read_config()
    check_fits(config, purpose="inference")
    return run.load(config)
