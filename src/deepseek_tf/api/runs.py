"""Opening a run directory: `load(run_dir) -> (model, tokenizer)`.

Examples:

>>> import deepseek_tf as ds                                   # doctest: +SKIP
>>> model, tokenizer = ds.load("runs/char")                    # doctest: +SKIP
>>> model([tokenizer.encode("ROMEO:")]).shape                  # doctest: +SKIP
TensorShape([1, 6, 65])
"""

from __future__ import annotations

from deepseek_tf.rundir import load_run


def load(run_dir):
    """Loads a run directory: `(model, tokenizer)` with its latest readable weights.

    Args:
        run_dir: a directory written by `train`, `federated`, `convert_from_hf`,
            `calibrate` or a `compress` method.

    Returns:
        `(model, tokenizer)`: a `keras.Model` (`deepseek_tf.models.CausalLM`) and the
        run's tokenizer, or None for a run without one (e.g. a converted checkpoint whose
        source shipped no `tokenizer.json`; the model then takes token ids).

    Raises:
        RunDirError: no run there, or no readable checkpoint.
        ConfigError: the model does not fit this machine's memory.
    """
    return load_run(run_dir)
