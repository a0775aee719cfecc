"""Several LoRA adapters served beside their base (`serve --lora NAME=RUN_DIR`): each
request's `model` picks one, rows of different adapters decode in one batch, and every
reply is what `generate` of that LoRA run (the merged model) gives."""

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving_helpers import forward_greedy

from deepseek_tf.api import load, train
from deepseek_tf.api.deployment import serve
from deepseek_tf.config.loader import load_config
from deepseek_tf.errors import InputError
from deepseek_tf.models.multi_lora import read_adapter
from deepseek_tf.rundir import RunDir

openai = pytest.importorskip("openai")

# two adapters of different ranks and targets, trained hard enough to change the replies
ADAPTERS = {"poet": ("4", "[attention]"), "bard": ("2", "[ffn,o_proj]")}
PROMPTS = ["ROMEO:\nWhat is", "Th", "First Citizen:"]


@pytest.fixture(scope="module")
def lora_runs(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    runs = {}
    for name, (rank, targets) in ADAPTERS.items():
        config = load_config("tiny", overrides=[
            "train.steps=4", "train.eval_every=0", f"train.lora_rank={rank}",
            f"train.lora_targets={targets}", "train.learning_rate=0.05",
        ])  # fmt: skip
        train(config, out=root / name, verbose=0, init_from=trained_run, sample_tokens=0)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="module")
def served(trained_run, lora_runs):
    specs = [f"{name}={path}" for name, path in lora_runs.items()]
    with serve(
        trained_run, port=0, model_name="tiny", max_batch=8, lora=specs, warm_up=False
    ) as served:  # shapes compile on first use
        assert served.wait_ready(300)
        yield served


@functools.cache
def _loaded(run):
    return load(run)  # once per run for the whole file


def _expected(run, n: int, prompts=PROMPTS) -> list[str]:
    """What greedy decoding of the run (the merged model) gives: the plain reference."""
    model, tok = _loaded(run)
    out = forward_greedy(model, [tok.encode(p) for p in prompts], n, tok.vocab_size)
    return [tok.decode(ids) for ids in out]


def test_each_model_name_gives_its_merged_models_tokens_in_one_batch(
    served, trained_run, lora_runs
):
    runs = {"tiny": trained_run, **lora_runs}
    expected = {name: _expected(run, 10) for name, run in runs.items()}
    assert expected["poet"] != expected["tiny"] and expected["bard"] != expected["tiny"]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="-", max_retries=0)

    def one(job):
        name, prompt = job
        out = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
        assert out.model == name
        return out.choices[0].text

    # the base's request leaves its prompt's keys in the prefix cache; an adapter's prompt
    # that starts with it must not be handed them (a hybrid model reuses whole entries)
    stem, longer = "First Citizen:\nBefore we", "First Citizen:\nBefore we proceed"
    prefix = served.app.batcher.prefix
    assert one(("tiny", stem)) == _expected(trained_run, 10, [stem])[0]
    hits = prefix.hit_tokens
    for name in ("poet", "bard"):
        assert one((name, longer)) == _expected(runs[name], 10, [longer])[0], name
    assert prefix.hit_tokens == hits  # nothing of the base's was reused
    assert one(("tiny", longer)) == _expected(trained_run, 10, [longer])[0]
    assert prefix.hit_tokens > hits  # while the base's own next request reuses it
    # the same prompts under three names, interleaved: rows of every adapter share batches
    jobs = [(name, p) for p in PROMPTS for name in runs] * 2
    with ThreadPoolExecutor(9) as pool:
        texts = list(pool.map(one, jobs))
    assert texts == [expected[name][PROMPTS.index(p)] for name, p in jobs]


def test_models_lists_the_adapters_and_unknown_names_are_404(served):
    import json
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(served.url + "/v1/models") as r:
        data = json.load(r)["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        ("tiny", None), ("poet", "tiny"), ("bard", "tiny")
    ]  # fmt: skip
    body = json.dumps({"model": "sonnet", "prompt": "Th", "max_tokens": 2}).encode()
    request = urllib.request.Request(served.url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    error = json.load(e.value)["error"]
    assert e.value.code == 404 and error["param"] == "model"
    assert "'sonnet' does not exist" in error["message"] and "'poet'" in error["message"]


def test_an_adapter_of_another_base_is_refused(trained_run, lora_runs):
    base, _ = load(trained_run)
    base.embedding.embeddings.assign(base.embedding.embeddings + 1.0)  # another base
    model, _ = load(lora_runs["poet"])
    config = RunDir(lora_runs["poet"]).read_config()
    with pytest.raises(InputError, match="--lora poet: its frozen weights are not the served"):
        read_adapter("poet", model, config, base)


@pytest.mark.parametrize(
    ("lora", "options", "match"),
    [
        (["poet"], {}, "--lora 'poet': expected NAME=RUN_DIR"),
        (["a=x", "a=y"], {}, "the adapter name 'a' is given twice"),
        (["{run}"], {}, "has no adapters"),
        (["poet={poet}"], {"batching": "dynamic"}, "served by continuous batching"),
        (["tiny={poet}"], {"model_name": "tiny"}, "must differ"),
    ],
)
def test_bad_lora_options_are_one_line_errors(trained_run, lora_runs, lora, options, match):
    lora = [s.format(run=f"x={trained_run}", poet=lora_runs["poet"]) for s in lora]
    with pytest.raises(InputError, match=match):
        serve(trained_run, port=0, warm_up=False, lora=lora, **options)


def test_predict_uses_the_base_while_adapters_are_installed(served, trained_run):
    model, _ = load(trained_run)
    ids = np.asarray([[3, 4, 5, 6]], np.int32)
    want = np.asarray(model(ids, training=False))[0, -1]
    got = served.app.predict("tiny", {"instances": [ids[0].tolist()], "signature_name": "logits"})
    np.testing.assert_allclose(got["predictions"][0], want, atol=1e-4)


def test_mla_adapters_on_kv_b_proj_decode_from_the_naive_cache(shared_run, tmp_path):
    moe = ("model.blocks=[attention]", "train.steps=2", "train.eval_every=0")  # as test_gguf's
    base_run = shared_run("tiny-moe", moe)
    config = load_config("tiny-moe", overrides=[
        *moe, "train.lora_rank=4", "train.lora_targets=[attention]", "train.learning_rate=0.05",
    ])  # fmt: skip
    train(config, out=tmp_path / "mla", verbose=0, init_from=base_run, sample_tokens=0)
    model, tok = load(tmp_path / "mla")  # the merged kernels
    expected = tok.decode(forward_greedy(model, [tok.encode(PROMPTS[0])], 8, tok.vocab_size)[0])
    with serve(base_run, port=0, model_name="base", lora=[f"mla={tmp_path / 'mla'}"],
               warm_up=False, max_batch=2) as s:  # fmt: skip
        assert not s.app.model.blocks[0].attention.absorb  # kv_b_proj has an adapter
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        out = client.completions.create(model="mla", prompt=PROMPTS[0], max_tokens=8,
                                        temperature=0)  # fmt: skip
    assert out.choices[0].text == expected
