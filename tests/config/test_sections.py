"""The config's split: architecture (`model`), what produced it (`compression`,
`calibration`) and how a run is loaded (`model.dtype`); old runs that kept the moved keys
under `model:` still read."""

import shutil

import pytest
import yaml

from deepseek_tf.config.loader import (
    MOVED_KEYS,
    apply_overrides,
    config_from_yaml,
    config_to_dict,
    config_to_yaml,
    load_config,
    moved_key,
    parse_override,
    update_config,
)
from deepseek_tf.config.schema import SECTIONS, CalibrationConfig, CompressionConfig, Config
from deepseek_tf.convert.init_from import init_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import build_model, inference_dtype, native_bfloat16
from deepseek_tf.rundir import RunDir, load_run

# What `compress` and `calibrate` wrote before the split, under `model:` (tiny: 2 layers,
# 4 heads in kv groups of 2).
OLD_KEYS = {
    "layer_n_heads": [2, 4],
    "layer_ffn_dims": [32, 0],
    "lowrank": ["0/ffn/up_proj=8"],
    "quantize": "int8",
    "quantize_include": ["ffn"],
    "quantize_group_size": 32,
    "logit_temperature": 1.5,
}


def _old_style(config) -> dict:
    """`config` as a pre-split run's config.yaml held it: every section, with the moved
    keys under `model` and no `compression`/`calibration` section."""
    data = config_to_dict(config)
    for section in ("compression", "calibration"):
        data["model"].update(data.pop(section))
    data["model"].update(OLD_KEYS)
    return data


def test_every_moved_key_has_a_home_and_left_the_architecture():
    model_keys = set(SECTIONS["model"].__dataclass_fields__)
    for key, section in MOVED_KEYS.items():
        assert key in SECTIONS[section].__dataclass_fields__ and key not in model_keys
        assert moved_key("model", key) == (section, key)
    assert set(MOVED_KEYS) == {
        *CompressionConfig.__dataclass_fields__,
        *CalibrationConfig.__dataclass_fields__,
    }
    assert moved_key("model", "d_model") == ("model", "d_model")
    assert moved_key("train", "quantize") == ("train", "quantize")  # only model's moved


def test_an_old_run_config_loads_into_the_new_sections_and_is_written_split(tmp_path):
    run = RunDir(tmp_path / "old")
    run.path.mkdir()
    run.config_path.write_text(yaml.safe_dump(_old_style(load_config("tiny"))), "utf-8")
    config = run.read_config()
    c = config.compression
    assert (c.layer_n_heads, c.layer_ffn_dims, c.layer_n_experts) == ((2, 4), (32, 0), ())
    assert c.lowrank == ("0/ffn/up_proj=8",) and c.quantize == "int8"
    assert (c.quantize_include, c.quantize_bits, c.quantize_group_size) == (("ffn",), 4, 32)
    assert config.calibration.logit_temperature == 1.5
    assert config.model.d_model == 32 and config.model.dtype == ""
    # written back: the new sections, nothing moved left under model
    run.write_config(config)
    written = yaml.safe_load(run.config_path.read_text("utf-8"))
    assert written["compression"]["quantize"] == "int8"
    assert written["calibration"] == {"logit_temperature": 1.5}
    assert not set(MOVED_KEYS) & set(written["model"])
    assert run.read_config() == config


def test_old_keys_in_a_yaml_file_and_in_set_overrides_still_work(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("preset: tiny\nmodel:\n  d_model: 48\n  quantize: int4\n", "utf-8")
    config = load_config(path=path, overrides=["model.logit_temperature=2"])
    assert config.model.d_model == 48 and config.compression.quantize == "int4"
    assert config.calibration.logit_temperature == 2.0
    assert load_config("tiny", overrides=["model.quantize=int8"]).compression.quantize == "int8"
    assert parse_override("model.quantize=int8") == ("compression", "quantize", "int8")
    # later sources win, whichever place they name
    again = apply_overrides(config, ["compression.quantize=int8", "model.fake_quant=false"])
    assert again.compression.quantize == "int8"
    assert update_config(config, model={"quantize": "none"}).compression.quantize == "none"
    new = update_config(config, compression={"quantize": "none"}, calibration={})
    assert new.compression.quantize == "none" and new.calibration.logit_temperature == 2.0


def test_a_key_in_both_places_and_bad_old_values_name_the_new_key():
    text = yaml.safe_dump({"model": {"quantize": "int8"}, "compression": {"quantize": "int4"}})
    with pytest.raises(ConfigError, match="model.quantize .the old place. and compression"):
        config_from_yaml(text, "config.yaml")
    with pytest.raises(ConfigError, match=r"^compression.layer_n_heads\[0\]: 3 heads"):
        load_config("tiny", overrides=["model.layer_n_heads=[3,4]"])
    with pytest.raises(ConfigError, match="^calibration.logit_temperature: must be > 0"):
        config_from_yaml(yaml.safe_dump({"model": {"logit_temperature": 0.0}}), "config.yaml")


@pytest.mark.parametrize(
    "flags, accelerators, native",
    [({"avx2", "fma"}, 0, False), ({"avx2", "avx512_bf16"}, 0, True), ({"amx_bf16"}, 0, True),
     ({"avx2"}, 1, True)],
)  # fmt: skip
def test_auto_dtype_is_bfloat16_only_where_the_hardware_multiplies_it(flags, accelerators,
                                                                       native):  # fmt: skip
    assert native_bfloat16(flags, accelerators) is native
    auto = update_config(Config(), model={"dtype": "auto"}, train={"precision": "bfloat16"})
    assert inference_dtype(auto) == ("bfloat16" if native_bfloat16() else "float32")
    with pytest.raises(ConfigError, match="model.dtype"):
        update_config(Config(), model={"dtype": "fast"})


def test_model_dtype_is_how_a_run_loads_and_training_keeps_train_precision(trained_run, tmp_path):
    config = RunDir(trained_run).read_config()
    assert config.model.dtype == "" and inference_dtype(config) == "float32"
    bf16 = update_config(config, model={"dtype": "bfloat16"})
    assert inference_dtype(bf16) == "bfloat16" and bf16.train.precision == "float32"
    assert "model:\n" in config_to_yaml(bf16) and "  dtype: bfloat16\n" in config_to_yaml(bf16)
    # training (the builder's default) keeps train.precision
    assert {v.dtype for v in build_model(bf16, seed=0).weights} == {"float32"}
    run = tmp_path / "bf16"
    shutil.copytree(trained_run, run)
    RunDir(run).write_config(bf16)
    model, _ = load_run(run)
    assert model.dtype_policy.name == "bfloat16"
    assert {v.dtype for v in model.weights if "/gate/" not in v.path} == {"bfloat16"}
    reference, _ = load_run(trained_run)
    assert {v.dtype for v in reference.weights} == {"float32"}
    # a run fine-tuned from it loads in the precision it trains in, unless told otherwise
    assert init_config(run)[0].model.dtype == ""
    assert init_config(run, overrides=["model.dtype=bfloat16"])[0].model.dtype == "bfloat16"
