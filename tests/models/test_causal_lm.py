import dataclasses

import numpy as np
import pytest

from deepseek_tf.config.loader import apply_overrides
from deepseek_tf.errors import InputError
from deepseek_tf.models.builder import build_model, parameter_count


def test_parameter_count_matches_built_model(tiny_config):
    for overrides in ([], ["model.tie_embeddings=false", "model.position=rope"]):
        config = apply_overrides(tiny_config, overrides)
        model = build_model(config, vocab_size=37)
        assert parameter_count(config, 37)["total"] == model.count_params()


def test_logits_are_causal_and_cached_forward_matches(tiny_config):
    config = apply_overrides(tiny_config, ["model.init_std=0.2"])
    model = build_model(config, vocab_size=23, seed=0)
    ids = np.random.RandomState(0).randint(0, 23, (2, 12)).astype("int32")
    full = np.asarray(model(ids))
    assert full.shape == (2, 12, 23) and full.dtype == np.float32
    other = ids.copy()
    other[:, 8:] = (other[:, 8:] + 1) % 23
    np.testing.assert_allclose(np.asarray(model(other))[:, :8], full[:, :8], atol=1e-5)
    cache = model.init_cache(2, 16)
    logits, cache = model.call_with_cache(ids[:, :5], cache, 0)
    pieces = [np.asarray(logits)]
    for i in range(5, 12):
        logits, cache = model.call_with_cache(ids[:, i : i + 1], cache, i)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4)
    # one position's logits (a prefill's last) are the full call's at that position
    for at in (4, 2):
        one, _ = model.call_with_cache(ids[:, :5], model.init_cache(2, 16), 0, logits_at=at)
        assert one.shape == (2, 1, 23)
        np.testing.assert_allclose(np.asarray(one)[:, 0], full[:, at], atol=1e-4)


def test_embedding_noise_only_in_training(tiny_config):
    data = dataclasses.replace(tiny_config.data, embedding_noise=True, embedding_noise_std=0.05)
    model = build_model(dataclasses.replace(tiny_config, data=data), vocab_size=10, seed=0)
    ids = np.zeros((4, 16), "int32")
    clean = np.asarray(model.embed(ids, training=False))
    np.testing.assert_array_equal(np.asarray(model.embed(ids, training=False)), clean)
    noisy = np.asarray(model.embed(ids, training=True))
    assert np.std(noisy - clean) == pytest.approx(0.05, rel=0.15)


def test_bad_token_ids_and_lengths_raise_input_error(tiny_config):
    model = build_model(tiny_config, vocab_size=10)
    with pytest.raises(InputError, match="token id 10 is out of range"):
        model(np.array([[1, 10]], "int32"))
    with pytest.raises(InputError, match="token id -1"):
        model(np.array([[-1, 2]], "int32"))
    assert model([[1, 2, 3]]).shape == (1, 3, 10)  # plain Python lists are accepted
    with pytest.raises(InputError, match="exceeds the model's context of 48"):
        model(np.zeros((1, 49), "int32"))


@pytest.mark.parametrize("share", ["ffn", "attention", "both"])
def test_adjacent_layers_share_weights(tiny_config, tmp_path, share):
    config = apply_overrides(tiny_config, [f"model.share_adjacent={share}", "model.n_layers=4"])
    plain = apply_overrides(tiny_config, ["model.n_layers=4"])
    model = build_model(config, vocab_size=13, seed=0)
    unique = {id(w): int(np.prod(w.shape)) for w in model.weights}
    counts = parameter_count(config, 13)
    assert counts["total"] == sum(unique.values())
    assert counts["shared_saving"] > 0
    assert counts["total"] == parameter_count(plain, 13)["total"] - counts["shared_saving"]
    if share in ("ffn", "both"):
        assert (
            model.blocks[1].ffn is model.blocks[0].ffn
            and model.blocks[2].ffn is not model.blocks[1].ffn
        )
    # a shared weight updated once changes both layers; checkpoints keep the sharing
    from deepseek_tf.rundir import RunDir

    RunDir(tmp_path).checkpoint(model).save(0)
    clone = build_model(config, vocab_size=13, seed=1)
    RunDir(tmp_path).checkpoint(clone).restore(weights_only=True)
    ids = np.arange(10, dtype="int32")[None] % 13
    np.testing.assert_allclose(np.asarray(clone(ids)), np.asarray(model(ids)), atol=1e-6)


@pytest.mark.parametrize("fraction, attention", [(0.3, "mha"), (1.0, "mha"), (0.5, "mla")])
def test_a_fraction_of_adjacent_projections_is_shared(tiny_config, tmp_path, fraction, attention):
    """`model.share_fraction`: the first round(f * n) of each pair's projections (attention
    then FFN, in declaration order) are one layer; counts, training state and
    checkpoints see one set of weights."""
    from deepseek_tf.models.sharing import shareable_projections
    from deepseek_tf.rundir import RunDir

    base = ["model.n_layers=4", "model.blocks=[attention]", f"model.attention={attention}"]
    if attention == "mla":
        base += ["model.position=rope", "model.kv_lora_rank=16", "model.qk_rope_head_dim=4",
                 "model.qk_nope_head_dim=4", "model.v_head_dim=8"]  # fmt: skip
    config = apply_overrides(tiny_config, [*base, f"model.share_fraction={fraction}"])
    plain = apply_overrides(tiny_config, base)
    model = build_model(config, vocab_size=13, seed=0)
    names = shareable_projections(model.blocks[0], model.blocks[1])
    shared = names[: round(fraction * len(names))]
    assert shared and len(names) == (7 if attention == "mha" else len(names))
    for first, second in ((0, 1), (2, 3)):
        for sub, proj in names:
            a = getattr(getattr(model.blocks[first], sub), proj)
            b = getattr(getattr(model.blocks[second], sub), proj)
            assert (a is b) == ((sub, proj) in shared), (sub, proj)
    assert getattr(model.blocks[1].attention, names[0][1]) is not getattr(
        model.blocks[2].attention, names[0][1]
    )  # only within a pair
    unique = {id(w): int(np.prod(w.shape)) for w in model.weights}
    counts = parameter_count(config, 13)
    saved = sum(
        int(np.prod(getattr(getattr(model.blocks[0], s), p).kernel.shape)) for s, p in shared
    )
    assert counts["total"] == sum(unique.values())
    assert counts["shared_saving"] == 2 * saved  # two pairs
    assert counts["total"] == parameter_count(plain, 13)["total"] - counts["shared_saving"]
    RunDir(tmp_path).checkpoint(model).save(0)
    clone = build_model(config, vocab_size=13, seed=1)
    RunDir(tmp_path).checkpoint(clone).restore(weights_only=True)
    ids = np.arange(10, dtype="int32")[None] % 13
    np.testing.assert_allclose(np.asarray(clone(ids)), np.asarray(model(ids)), atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.share_fraction=1.5"], r"^model\.share_fraction: must be in \[0, 1\]"),
        (["model.share_fraction=-0.1"], r"^model\.share_fraction: must be in \[0, 1\]"),
        (
            ["model.share_fraction=0.3", "model.share_adjacent=ffn"],
            r"^model\.share_fraction: .*not both",
        ),
    ],
)
def test_bad_share_fraction_names_the_key(tiny_config, overrides, message):
    from deepseek_tf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny_config, overrides)
