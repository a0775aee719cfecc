"""Keras variables created without running their initialisers (a patch of Keras).

Why this exists: loading a run or converting a Hugging Face checkpoint builds a model
whose every weight is then overwritten. Running the initialisers first costs time and,
worse, memory: TensorFlow's CPU allocator (oneDNN's, the default) keeps every page it
ever used, so the float32 temporaries of random initialisers stay resident and peak RSS
becomes the model twice. Inside `initializers_skipped()` a variable's memory is left
unwritten (or zero-filled); the initialisers that were skipped are run afterwards for
the variables nothing overwrote (`SkippedInitializers.run_except`).

Keras has no public hook for this. The patched method is the backend variable's
`_initialize_with_initializer(self, initializer)` (Keras 3: `keras.Variable` inherits it
from `keras.src.backend.tensorflow.core.Variable`), which a variable calls once, with its
`keras.initializers.Initializer`, when it is created eagerly. It is wrapped only while a
block is open (reference-counted across threads; the skipping itself is per thread) and
restored afterwards. `tests/layers/test_deferred_init.py` fails if Keras renames the
method, changes its signature or stops routing initialisation through it; without the
method the block initialises variables as usual (correct, only slower).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import keras
import tensorflow as tf

PATCHED_METHOD = "_initialize_with_initializer"  # on keras.Variable, (self, initializer)

_SKIPPING = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH: dict = {"users": 0}


class SkippedInitializers:
    """The Keras variables created under `initializers_skipped`, with the initialisers
    they did not run.

    Args:
        zero_fill: the variables hold zeros instead of unwritten memory.
    """

    def __init__(self, zero_fill: bool = False):
        self.pending: list = []
        self.zero_fill = zero_fill

    def run_except(self, model, loaded) -> int:
        """Runs the skipped initialiser of each of `model`'s variables not in `loaded` (the
        ones something overwrote); returns how many ran.

        Args:
            model: a layer or model whose `variables` were created under the block.
            loaded: the variables that received their values some other way.

        Returns:
            The number of initialisers run now.
        """
        done, live = {id(v) for v in loaded}, {id(v) for v in model.variables}
        pending = [(ref(), f) for ref, f in self.pending]
        rest = [(v, f) for v, f in pending if id(v) in live and id(v) not in done]
        for variable, initializer in rest:
            variable.assign(initializer(tuple(variable.shape), dtype=variable.dtype))
        self.pending = []
        return len(rest)


def _uninitialized(self, initializer):
    """The patched `keras.Variable._initialize_with_initializer`."""
    skipped = getattr(_SKIPPING, "current", None)
    if skipped is not None and isinstance(initializer, keras.initializers.Initializer):
        # a weak reference: a variable its layer deletes (a float kernel replaced by
        # quantized codes) is freed at once, not kept alive by this list
        skipped.pending.append((weakref.ref(self), initializer))
        zeros = skipped.zero_fill

        def initializer(shape, dtype):  # unless zero-filled, no page of it is touched
            return tf.raw_ops.Empty(shape=shape, dtype=tf.as_dtype(dtype), init=zeros)

    _PATCH["original"](self, initializer)


def _install() -> None:
    with _PATCH_LOCK:
        if _PATCH["users"] == 0 and hasattr(keras.Variable, PATCHED_METHOD):
            _PATCH.update(
                saved=vars(keras.Variable).get(PATCHED_METHOD),
                original=getattr(keras.Variable, PATCHED_METHOD),
            )
            setattr(keras.Variable, PATCHED_METHOD, _uninitialized)
        _PATCH["users"] += 1


def _uninstall() -> None:
    with _PATCH_LOCK:
        _PATCH["users"] -= 1
        if _PATCH["users"] == 0 and _PATCH.pop("original", None) is not None:
            saved = _PATCH.pop("saved")
            if saved is None:
                delattr(keras.Variable, PATCHED_METHOD)
            else:
                setattr(keras.Variable, PATCHED_METHOD, saved)


@contextlib.contextmanager
def initializers_skipped(zero_fill: bool = False):
    """Keras variables created inside (in this thread) do not run their initialisers.

    Only `keras.initializers.Initializer`s are skipped (seed-generator states and the
    like are initialised as usual). Their memory is left unwritten, for weights about to
    be overwritten, or zero-filled with `zero_fill` (for a build that computes from them,
    as quantization does).

    Args:
        zero_fill: fill the skipped variables with zeros.

    Yields:
        A `SkippedInitializers` that runs the skipped ones later where nothing was loaded.

    Examples:
    >>> with initializers_skipped() as skipped:
    ...     layer = keras.layers.Dense(2)
    ...     layer.build((None, 3))
    >>> len(skipped.pending)  # kernel and bias, not initialised yet
    2
    >>> skipped.run_except(layer, loaded=[layer.kernel])  # the bias was not loaded
    1
    """
    _install()
    skipped, outer = SkippedInitializers(zero_fill), getattr(_SKIPPING, "current", None)
    _SKIPPING.current = skipped
    try:
        yield skipped
    finally:
        _SKIPPING.current = outer
        _uninstall()
