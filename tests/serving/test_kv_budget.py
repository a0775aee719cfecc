"""The serving cache sized to a budget: `--max-model-len`, `--kv-cache-memory`, a
checkpoint with DeepSeek's 163,840-position context served with default flags."""

import numpy as np
import pytest
import tensorflow as tf
from serving_helpers import request, start_server

from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import InputError
from deepseek_tf.models.builder import build_model
from deepseek_tf.serving.kv_budget import WORKING_COPIES, cache_bytes, parse_size, plan_cache
from deepseek_tf.serving.server import ServingApp

VOCAB = 37
LONG = 163_840  # DeepSeek-V2/V3's published context


@pytest.fixture(scope="module")
def long_model():
    """tiny-moe (MLA, MoE, a hybrid block with a convolution state) with V3's context."""
    config = apply_overrides(load_config(preset="tiny-moe"), [f"model.max_seq_len={LONG}"])
    return build_model(config, vocab_size=VOCAB, seed=5)


def leaf_bytes(cache) -> int:
    return sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten(cache))


@pytest.mark.parametrize(
    "text, size",
    [("4GiB", 4 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29), ("1000", 1000), (2048, 2048)],
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "4 parsecs", "-1G", "0", ""])
def test_bad_sizes_are_one_line_errors(text):
    with pytest.raises(InputError, match="--kv-cache-memory"):
        parse_size(text)


def test_cache_bytes_predict_the_cache_allocated(long_model):
    per_position, fixed = cache_bytes(long_model, 3)
    assert per_position > 0 and fixed > 0  # latents grow; the hybrid block's conv state not
    assert leaf_bytes(long_model.init_cache(3, 200)) == fixed + 200 * per_position


def test_the_budget_bounds_the_rows(long_model):
    per_position, fixed = cache_bytes(long_model, 4)
    budget = WORKING_COPIES * (fixed + 1000 * per_position) + per_position // 2
    plan = plan_cache(long_model, 4, kv_cache_memory=budget)
    assert plan.max_model_len == 1000 and plan.peak_bytes <= plan.budget == budget
    assert plan.bytes == fixed + 1000 * per_position  # the cache; its working copies beside it
    assert "4 slots x 1,000 positions" in plan.describe() and "163,840" in plan.describe()
    assert plan_cache(long_model, 4, 500, budget).max_model_len == 500  # the flag, lower


@pytest.mark.parametrize(
    "max_model_len, memory, message",
    [
        (LONG + 1, None, "between 1 and the checkpoint's context of 163,840"),
        (0, None, "between 1 and"),
        (4000, "1MiB", "holds .* positions per slot for 4 slots"),  # the flag does not fit
        (None, "4KiB", r"4.0 KiB \(as given\) holds \d positions"),  # not a short row
    ],
)
def test_impossible_plans_are_one_line_errors(long_model, max_model_len, memory, message):
    with pytest.raises(InputError, match=message):
        plan_cache(long_model, 4, max_model_len, memory)


def test_a_prompt_limit_at_the_model_len_is_refused(long_model):
    with pytest.raises(InputError, match="--max-prompt-tokens 64 leaves no room"):
        ServingApp(long_model, None, "m", max_model_len=64, max_prompt_tokens=64,
                   kv_cache_memory="64MiB", warm_up=False)  # fmt: skip


def test_a_budget_serves_a_163840_position_checkpoint(long_model):
    """A budget: the plan fits it, the cache allocated is the plan, requests
    within the bound are answered and longer ones get a 400 naming it."""
    srv, app, url = start_server(
        long_model, None, max_batch=4, kv_cache_memory="8MiB", jit_compile=False
    )
    try:
        plan = app.cache_plan
        assert 64 <= plan.max_model_len < LONG and plan.peak_bytes <= plan.budget == 8 << 20
        assert leaf_bytes(app.batcher.cache) == plan.bytes  # what the scheduler holds
        status, health = request(url, "GET", "/health")
        assert status == 200 and health["kv_cache"]["max_model_len"] == plan.max_model_len
        (listed,) = request(url, "GET", "/v1/models")[1]["data"]
        assert listed["max_model_len"] == plan.max_model_len
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
        status, answer = request(url, "POST", "/v1/completions", body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 4
        too_long = {"prompt": [1] * plan.max_model_len, "max_tokens": 1}
        status, answer = request(url, "POST", "/v1/completions", too_long)
        assert status == 400 and f"{plan.max_model_len}" in answer["error"]["message"]
        assert answer["error"]["code"] == "context_length_exceeded"
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()


def test_no_flags_take_a_quarter_of_available_memory(long_model):
    app = ServingApp(long_model, None, "m", max_batch=16, warm_up=False)
    plan = app.cache_plan
    assert "25% of the" in plan.budget_source and plan.peak_bytes <= plan.budget
    per_position, fixed = cache_bytes(long_model, 16)
    fits = (plan.budget // WORKING_COPIES - fixed) // per_position
    assert plan.max_model_len == min(LONG, fits)
