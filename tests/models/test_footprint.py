"""Memory estimates from the layers' own declarations, before anything is allocated."""

import math

import pytest

from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.footprint import check_fits, estimate


@pytest.mark.parametrize(
    "preset,overrides", [("tiny", []), ("tiny-moe", ["model.mla_absorb=false"])]
)
def test_estimate_counts_what_the_built_model_allocates(preset, overrides):
    config = apply_overrides(load_config(preset), ["model.vocab_size=40", *overrides])
    est = estimate(config)
    model = build_model(config)
    assert est["parameters"] == sum(math.prod(w.shape) for w in model.weights)
    cache = model.init_cache(1, 10)
    grows = sum(math.prod(t.shape) for layer in cache for k, t in layer.items() if k != "conv")
    assert est["cache"] == config.model.max_seq_len * grows // 10 * 4


def test_many_layers_are_sampled_and_scaled():
    base = apply_overrides(load_config("tiny"), ["model.vocab_size=40"])
    small, big = (estimate(apply_overrides(base, [f"model.n_layers={n}"])) for n in (64, 128))
    outside = 40 * 32 + 32  # embedding + final norm (tied head)
    assert big["parameters"] - outside == 2 * (small["parameters"] - outside)
    assert big["cache"] == 2 * small["cache"]


def test_refusal_names_the_largest_need():
    config = apply_overrides(load_config("tiny"), ["model.vocab_size=40"])
    check_fits(config, "train")
    with pytest.raises(ConfigError, match="train.batch_size=4 x data.seq_len=16"):
        check_fits(config, "train", available=1000)
    long = apply_overrides(config, ["model.max_seq_len=100000000"])
    with pytest.raises(ConfigError, match="model.max_seq_len=100000000"):
        check_fits(long, "inference")


@pytest.mark.parametrize("mode, width", [("int8", 1), ("int4", 0.5)])
def test_quantized_weights_are_counted_at_their_codes_width(mode, width):
    config = apply_overrides(load_config("tiny-moe"), ["model.vocab_size=40"])
    quantized = apply_overrides(
        config,
        [f"compression.quantize={mode}", "compression.quantize_include=[attention,ffn,experts]"],
    )
    params, m = estimate(config)["parameters"], config.model
    table = 40 * m.d_model * (1 if m.tie_embeddings else 2)  # float: the embedding (+ head)
    want = table * 4 + (params - table) * width
    assert estimate(quantized)["weights"] == int(want) < estimate(config)["weights"]
