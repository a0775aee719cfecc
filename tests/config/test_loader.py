import pytest

from deepseek_tf.config.loader import (
    apply_overrides,
    load_config,
    parse_override,
    preset_names,
)
from deepseek_tf.errors import ConfigError, RunDirError
from deepseek_tf.rundir import RunDir


def test_presets_load_and_shakespeare_char_is_the_nanogpt_recipe():
    assert {"tiny", "shakespeare-char"} <= set(preset_names())
    c = load_config()  # the default preset
    assert (c.model.n_layers, c.model.n_heads, c.model.d_model) == (4, 4, 128)
    assert (c.data.seq_len, c.train.batch_size, c.train.steps) == (64, 12, 2000)
    assert (c.train.learning_rate, c.model.dropout, c.data.tokenizer) == (1e-3, 0.0, "char")


def test_overrides_are_typed():
    c = load_config(
        "tiny",
        overrides=[
            "train.steps=7",
            "train.learning_rate=1e-4",
            "model.blocks=[hybrid]",
            "runtime.jit_compile=true",
        ],
    )
    assert c.train.steps == 7 and c.train.learning_rate == pytest.approx(1e-4)
    assert c.model.blocks == ("hybrid",) and c.runtime.jit_compile is True
    assert parse_override("data.files=a.txt") == ("data", "files", "a.txt")


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.n_layrs=3", "model.n_layrs: unknown key"),
        ("modl.n_layers=3", "unknown section 'modl'"),
        ("train.steps=abc", "train.steps: expected int, got str 'abc'"),
        ("train.steps=2.5", "train.steps: expected int"),
        ("runtime.jit_compile=maybe", "runtime.jit_compile: expected bool"),
        ("model.blocks=[attention, mamba]", "model.blocks[1]: 'mamba' is not one of"),
        ("data.seq_len=100", "exceed model.max_seq_len=48"),
        ("model.n_kv_heads=3", "model.n_kv_heads: 3 does not divide"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("train.steps", "expected section.key=value"),
        ("compression.layer_n_heads=[2]", "compression.layer_n_heads: needs model.n_layers=2"),
        ("compression.layer_n_heads=[3,4]", "layer_n_heads[0]: 3 heads is not whole kv groups"),
        ('compression.lowrank=["0/ffn/up_proj"]', "is not LAYER/attention|ffn/PROJECTION=RANK"),
        ('compression.lowrank=["5/ffn/up_proj=4"]', "layer or rank out of range"),
        ("compression.quantize=int3", "compression.quantize: 'int3' is not one of"),
        ("model.quantize=int3", "compression.quantize: 'int3' is not one of"),  # the old place
        ("calibration.logit_temperature=0", "calibration.logit_temperature: must be > 0"),
        ("model.dtype=fp8", "model.dtype: 'fp8' is not one of"),
        # reported under its own key (the MTP check used to speak first)
        ("data.seq_len=0", "data.seq_len: must be > 0"),
        ("train.steps=" + "9" * 5000, "--set train.steps: unreadable value"),
        ("train.steps=" + "[" * 20000, "--set train.steps"),
        # keys this model's layer types never read are refused, not ignored
        ("model.kv_lora_rank=64", "model.kv_lora_rank: set to 64, but only read with model"),
        ("model.n_routed_experts=0", None),
        ("model.num_experts_per_tok=4", "only read with model.n_routed_experts > 0"),
        ("model.conv_kernel_size=5", None),
        ("model.mtp_loss_weight=0.5", "only read with model.mtp_depth > 0"),
        ("compression.quantize_include=[attention,tail]", "quantize_include[1]: 'tail'"),
        ("data.vocab_size=10", "data.vocab_size: set to 10, but only read with data.tokenizer"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    if message is None:  # accepted: the key is read by this model
        load_config("tiny", overrides=[override])
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny", overrides=[override])


def test_mla_refuses_the_mha_head_keys_and_honours_rope_layout():
    for key in ("n_kv_heads=2", "head_dim=8"):
        with pytest.raises(ConfigError, match="only read with model.attention: mha"):
            load_config("tiny-moe", overrides=[f"model.{key}"])
    from deepseek_tf.models.builder import attention_config

    half = load_config("tiny-moe", overrides=["model.rope_layout=half"])
    assert attention_config(half.model)["rope_layout"] == "half"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x00\x01\x02binary\xff", "is not UTF-8 text"),
        ("model:\n  d_model: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        (b"model:\n  d_model: 64\n  d_model: 32\n", "'d_model' is given twice (line 3)"),
        (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
        (b"train:\n  steps: " + b"7" * 5000 + b"\n", "unreadable value"),
    ],
)
def test_unreadable_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path=path)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(path=tmp_path)


def test_bad_files_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("preset: tiny\nmodel:\n  d_modl: 64\n")
    with pytest.raises(ConfigError, match="model.d_modl: unknown key"):
        load_config(path=typo)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path=tmp_path / "missing.yaml")


def test_file_on_top_of_preset_and_run_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntrain:\n  steps: 3\n")
    c = load_config(path=path, overrides=["train.batch_size=2"])
    assert (c.train.steps, c.train.batch_size, c.model.d_model) == (3, 2, 32)
    RunDir(tmp_path / "run").write_config(c)
    assert RunDir(tmp_path / "run").read_config() == c
    assert apply_overrides(c, ["train.steps=9"]).train.steps == 9
    with pytest.raises(RunDirError, match="no config.yaml"):
        RunDir(tmp_path).read_config()
