"""Speculative decoding with MTP drafts: greedy output is plain decoding's token for token,
sampled output keeps plain sampling's distribution, the round-at-a-time API, bad input."""

import numpy as np
import pytest
import tensorflow as tf

import deepseek_tf.generation.speculative_loop as speculative_loop
from deepseek_tf.api import load, train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import InputError
from deepseek_tf.generation.decoder import Row
from deepseek_tf.generation.generate import Generator
from deepseek_tf.generation.sampler import filter_logits
from deepseek_tf.generation.speculative import (
    SpeculativeDecoder,
    cannot_gain,
    last_level_cache_bytes,
)
from deepseek_tf.generation.speculative_sampling import (
    DRAFT_NOISE,
    accept_drafts,
    sample_probs,
    token_probs,
)
from deepseek_tf.models.builder import build_model

VOCAB = 29
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7, 9, 3]]  # rows of different lengths


def random_model(*overrides, seed=0):
    """tiny-moe (MLA, DeepSeekMoE, blocks attention/hybrid) with random weights."""
    config = apply_overrides(load_config("tiny-moe"), list(overrides))
    return build_model(config, vocab_size=VOCAB, seed=seed)


@pytest.fixture(scope="module")
def trained_mtp(tmp_path_factory):
    """tiny-moe with two MTP modules trained for a few steps: its drafts are mostly right."""
    config = apply_overrides(
        load_config("tiny-moe"),
        ["model.mtp_depth=2", "train.steps=30", "train.eval_every=30", "train.checkpoint_every=30"],
    )
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-mtp"
    train(config, out=run_dir, verbose=0, sample_tokens=0)
    return run_dir


@pytest.mark.parametrize(
    "overrides,draft_tokens,new_tokens",
    [
        # a hybrid main block (its conv state is rewound); past the context (48) a sliding
        # window continues, as in plain decoding
        pytest.param(["model.mtp_depth=2"], 2, 70, marks=pytest.mark.slow),  # heavier
        (["model.mtp_depth=1", "model.n_layers=2"], 1, 30),  # a hybrid MTP block
        (["model.mtp_depth=3", "model.n_layers=1", "model.attention=mha"], 3, 30),
    ],
)
def test_greedy_equals_plain_decoding_on_random_models(overrides, draft_tokens, new_tokens):
    model = random_model(*overrides)
    prompts = PROMPTS if new_tokens <= 30 else PROMPTS[:1]
    plain = Generator(model, jit_compile=False).generate(prompts, new_tokens)
    spec = Generator(model, jit_compile=False, speculative="mtp", draft_tokens=draft_tokens)
    assert spec.generate(prompts, new_tokens) == plain
    stats = spec.speculative_stats
    assert len(stats["proposed"]) == draft_tokens and stats["rounds"] > 0


def test_greedy_rows_of_a_sampled_batch_equal_plain_decoding():
    model = random_model("model.mtp_depth=2", "model.n_layers=2")
    plain = Generator(model, jit_compile=False).generate(PROMPTS[:2], 20)
    decoder = SpeculativeDecoder(model, jit_compile=False)
    rows = [Row(PROMPTS[0], 20), Row(PROMPTS[2], 20, temperature=1.0, seed=4), Row(PROMPTS[1], 20)]
    out = decoder.start(rows).step()
    assert [out[0], out[2]] == plain and len(out[1]) == 20


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_greedy_equals_plain_decoding_on_a_trained_model_compiled(trained_mtp):
    model, tok = load(trained_mtp)
    prompts = [tok.encode("ROMEO:"), tok.encode("First Citizen:\nWe")]
    plain = Generator(model, vocab_limit=tok.vocab_size).generate(prompts, 30)
    spec = Generator(model, vocab_limit=tok.vocab_size, speculative="mtp", draft_tokens=1)
    assert spec.generate(prompts, 30) == plain  # XLA-compiled
    stats = spec.speculative_stats
    assert stats["accepted"][0] / stats["proposed"][0] > 0.5, stats  # drafts mostly kept


def test_rounds_one_at_a_time(trained_mtp):
    model, tok = load(trained_mtp)
    prompt = tok.encode("KING")
    whole = Generator(model, jit_compile=False).generate([prompt, prompt[:2]], 24)
    decoder = SpeculativeDecoder(model, jit_compile=False)
    state = decoder.start([Row(prompt, 24), Row(prompt[:2], 24)])
    pieces = [[], []]
    while not state.finished:
        for row, tokens in enumerate(state.step(rounds=1)):
            assert len(tokens) <= decoder.draft_tokens + 1
            pieces[row] += tokens
        drafted, accepted = state.last_round
        assert 0 <= accepted <= drafted
    assert pieces == whole
    assert state.step() == [[], []]  # nothing left
    assert state.proposed.sum() >= state.accepted.sum() > 0
    # a stop token ends its row; a cancelled row reports nothing more
    state = decoder.start([Row(prompt, 24), Row(prompt, 24)], stop_ids=[whole[0][3]])
    first = state.step(rounds=1)
    state.cancel(1)
    rest = state.step()
    assert first[0] + rest[0] == whole[0][: whole[0].index(whole[0][3]) + 1]
    assert rest[1] == []


def test_each_row_of_a_batch_keeps_its_own_drafts(trained_mtp):
    """Rows of one batch move as each would alone: the batch runs as many rounds as its
    slowest row alone and accepts every draft the rows accept alone (rows that shared
    one position kept the fewest any row accepted: more rounds, fewer accepted)."""
    model, tok = load(trained_mtp)
    decoder = SpeculativeDecoder(model, jit_compile=False)
    prompts = [tok.encode(text) for text in ("KING", "LORD", "What")]  # one length
    alone = []
    for prompt in prompts:
        state = decoder.start([Row(prompt, 24)])
        alone.append((state.step(), state.rounds, int(state.accepted.sum())))
    state = decoder.start([Row(prompt, 24) for prompt in prompts])
    tokens = state.step()
    assert tokens == [row[0][0] for row in alone]
    assert len({rounds for _, rounds, _ in alone}) > 1  # the rows differ ...
    assert state.rounds == max(rounds for _, rounds, _ in alone)  # ... and keep their pace
    assert int(state.accepted.sum()) == sum(accepted for *_, accepted in alone)


def exact_marginals(model, prompt, settings, steps=3):
    """The exact distributions of the first `steps` sampled tokens (plain sampling's
    filtered distributions, enumerated over every earlier token)."""

    def probs(ids):  # (N, V) of each sequence's next token
        logits = model(np.asarray(ids, np.int32))[:, -1]
        n = len(ids)
        return tf.nn.softmax(
            filter_logits(
                logits, *(tf.fill((n,), settings[k]) for k in ("temperature", "top_k", "top_p"))
            )
        ).numpy()

    joint, seqs, out = np.ones(1), [list(prompt)], []
    for _ in range(steps):
        joint = (joint[:, None] * probs(seqs)).reshape(-1)  # (V ** step,)
        out.append(joint.reshape(-1, VOCAB).sum(axis=0))
        seqs = [s + [t] for s in seqs for t in range(VOCAB)]
    return out


def total_variation(samples, exact):
    return [
        0.5 * np.abs(np.bincount(samples[:, i], minlength=VOCAB) / len(samples) - p).sum()
        for i, p in enumerate(exact)
    ]


@pytest.fixture(scope="module")
def sharp_model():
    """Random weights with sharpened logits: distributions a sample can tell apart."""
    model = random_model("model.mtp_depth=1", seed=3)
    model.logit_temperature = 0.05
    return model


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
        {"temperature": 0.7, "top_k": 6, "top_p": 0.9},
    ],
)
def test_sampling_keeps_the_distribution(sharp_model, settings, monkeypatch):
    prompt, n = [3, 1, 4, 1], 512
    exact = exact_marginals(sharp_model, prompt, settings)
    spec = Generator(sharp_model, jit_compile=False, speculative="mtp")
    samples = np.asarray(spec.generate([prompt] * n, 3, seed=0, **settings))
    assert max(total_variation(samples, exact)) < 0.12
    stats = spec.speculative_stats
    assert 0 < stats["accepted"][0] < stats["proposed"][0]  # both outcomes occurred
    if settings["top_k"]:
        return

    # the check has power: always keeping the drafts samples the MTP's distribution
    def always(logits, drafts, *args):
        kept, replacement = accept_drafts(logits, drafts, *args)
        return tf.fill(tf.shape(kept), tf.shape(drafts)[1]), replacement

    monkeypatch.setattr(speculative_loop, "accept_drafts", always)
    wrong = Generator(sharp_model, jit_compile=False, speculative="mtp")
    samples = np.asarray(wrong.generate([prompt] * n, 3, seed=0, **settings))
    assert max(total_variation(samples, exact)) > 0.3


def test_acceptance_rule_is_exact_for_chained_drafts():
    """`accept_drafts` on two drafts drawn from `q`, over many seeds: the first emitted
    token follows `p_1`, and the second, where the first draft was kept, `p_2`."""
    rng = np.random.default_rng(0)
    n, k, v = 20000, 2, 7
    p_logits = tf.constant(np.tile(rng.normal(size=(1, k + 1, v)) * 1.5, (n, 1, 1)), tf.float32)
    q_logits = rng.normal(size=(k, v)) * 1.5
    sampling = (tf.fill((n,), 0.8), tf.fill((n,), 0), tf.fill((n,), 1.0), tf.range(n))
    q = token_probs(
        tf.constant(q_logits, tf.float32), tf.fill((k,), 0.8), tf.zeros(k, tf.int32), tf.ones(k)
    )
    q = tf.tile(q[None], (n, 1, 1))  # (n, k, V)
    drafts = tf.stack(
        [sample_probs(q[:, i], sampling[3], 10 + i + DRAFT_NOISE) for i in range(k)], 1
    )
    forced = tf.zeros((n, k + 1), bool)
    kept, replacement = accept_drafts(p_logits, drafts, q, forced, sampling, 10)
    kept, drafts, replacement = kept.numpy(), drafts.numpy(), replacement.numpy()
    p = token_probs(
        p_logits[0], tf.fill((k + 1,), 0.8), tf.zeros(k + 1, tf.int32), tf.ones(k + 1)
    ).numpy()
    first = np.where(kept >= 1, drafts[:, 0], replacement[:, 0])
    on = kept >= 1
    second = np.where(kept[on] >= 2, drafts[on, 1], replacement[on, 1])
    for tokens, target in ((first, p[0]), (second, p[1])):
        emp = np.bincount(tokens, minlength=v) / len(tokens)
        assert 0.5 * np.abs(emp - target).sum() < 0.03
    assert 0.1 < on.mean() < 0.95  # both outcomes, many times


def test_greedy_rows_accept_exactly_the_argmax():
    logits = tf.constant([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]]] * 2)  # (2, 3, 3)
    drafts = tf.constant([[1, 0], [1, 2]])
    zeros = tf.zeros((2,))
    sampling = (zeros, tf.zeros((2,), tf.int32), tf.ones((2,)), tf.zeros((2,), tf.int32))
    forced = tf.constant([[False] * 3, [False, True, False]])
    kept, replacement = accept_drafts(logits, drafts, tf.zeros((2, 2, 3)), forced, sampling, 4)
    assert kept.numpy().tolist() == [2, 2]  # row 1's second draft is a forced prompt token
    assert replacement.numpy().tolist() == [[1, 0, 2], [1, 0, 2]]


def test_bad_input(loaded):
    no_mtp = loaded[0]
    for make in (
        lambda: SpeculativeDecoder(no_mtp),
        lambda: Generator(no_mtp, speculative="mtp"),
    ):
        with pytest.raises(InputError, match="needs a model with MTP modules"):
            make()
    model = random_model("model.mtp_depth=2")
    for bad in (0, 3, True, 1.5):
        with pytest.raises(InputError, match="draft tokens"):
            SpeculativeDecoder(model, draft_tokens=bad)
    with pytest.raises(InputError, match="speculative must be one of"):
        Generator(model, speculative="medusa")
    spec = Generator(model, jit_compile=False, speculative="mtp")
    with pytest.raises(InputError, match="log-probabilities"):
        spec.generate([[1, 2]], 4, details=True)


def test_cli_errors(trained_run, capsys):
    from deepseek_tf.cli.main import main

    for args, match in [
        ([trained_run, "--prompt", "A", "--speculative", "mtp"], "needs a model with MTP modules"),
        (
            [trained_run, "--prompt", "A", "--draft-tokens", "2"],
            "--draft-tokens needs --speculative",
        ),
        (
            [trained_run, "--prompt", "A", "--speculative", "mtp", "--show-uncertainty"],
            "--show-uncertainty is not available",
        ),
    ]:
        code = main(["generate", *map(str, args)])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert match in lines[0] and "Traceback" not in err + out


@pytest.mark.slow
def test_cli_speculative_greedy_text_equals_plain(trained_mtp, capsys):
    from deepseek_tf.cli.main import main

    texts, errs = [], []
    for extra in ([], ["--speculative", "mtp", "--draft-tokens", "1"]):
        args = ["generate", str(trained_mtp), "--prompt", "KING", "--max-new-tokens", "40"]
        assert main([*args, "--temperature", "0", *extra]) == 0
        out = capsys.readouterr()
        texts.append(out.out)
        errs.append(out.err)
    assert texts[0] == texts[1] and texts[0].startswith("KING")
    if last_level_cache_bytes():  # this tiny model fits in any CPU's cache: it says so
        assert "speculation cannot gain here" in errs[1] and "cannot gain" not in errs[0]


def test_speculation_says_when_it_cannot_gain(trained_mtp):
    model, _ = load(trained_mtp)
    weights = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in model.weights)
    note = cannot_gain(model, cache_bytes=weights)  # the weights just fit
    assert note.startswith("--speculative mtp:") and "cannot gain" in note
    assert cannot_gain(model, cache_bytes=weights - 1) is None  # a step reads memory
