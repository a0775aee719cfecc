"""Sharded and bfloat16 checkpoints, both ways."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_logits, hf_model, random_ids, rel_err  # noqa: E402

import deepseek_tf  # noqa: E402
from deepseek_tf.convert import CheckpointReader, convert_from_hf, convert_to_hf  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_model(hf_config(n_group=2, topk_group=1, first_k_dense_replace=1), seed=5)


def test_sharded_checkpoint_converts_and_exports_sharded(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    convert_from_hf(tmp_path / "hf", tmp_path / "run")
    model, _ = deepseek_tf.load(tmp_path / "run")
    ids = random_ids(hf.config.vocab_size, seed=6)
    assert rel_err(np.asarray(model(ids)), hf_logits(hf, ids)) < 1e-4

    convert_to_hf(tmp_path / "run", tmp_path / "back", max_shard_bytes=30_000)
    files = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "back" / "model.safetensors").exists()
    reader = CheckpointReader(tmp_path / "back")
    np.testing.assert_array_equal(
        reader.get("model.norm.weight"), hf.model.norm.weight.detach().numpy()
    )
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    assert rel_err(hf_logits(back.eval(), ids), hf_logits(hf, ids)) < 1e-4


def test_bfloat16_checkpoint_converts(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    hf.to(torch.float32)
    reader = CheckpointReader(tmp_path / "hf")
    assert reader.dtype("model.layers.1.mlp.experts.3.up_proj.weight") == "BF16"
    convert_from_hf(tmp_path / "hf", tmp_path / "run", dtype="float32")
    model, _ = deepseek_tf.load(tmp_path / "run")
    # the same bfloat16 weights, computed in float32 by transformers
    widened = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = random_ids(hf.config.vocab_size, seed=7)
    assert rel_err(np.asarray(model(ids)), hf_logits(widened, ids)) < 1e-4

    # By default the run keeps the checkpoint's bfloat16 (train.precision) and loads as
    # `model.dtype: auto` (float32 on a CPU without bf16 arithmetic); loaded in bfloat16:
    # bf16 variables, bf16 compute (float32 router, norms and softmax), as transformers
    # runs the same checkpoint.
    from deepseek_tf.config.loader import update_config
    from deepseek_tf.models.builder import native_bfloat16
    from deepseek_tf.rundir import RunDir

    convert_from_hf(tmp_path / "hf", tmp_path / "run_bf16")
    run = RunDir(tmp_path / "run_bf16")
    config = run.read_config()
    assert (config.train.precision, config.model.dtype) == ("bfloat16", "auto")
    auto, _ = deepseek_tf.load(run.path)
    assert auto.embedding.embeddings.dtype == ("bfloat16" if native_bfloat16() else "float32")
    run.write_config(update_config(config, model={"dtype": "bfloat16"}))
    bf16, _ = deepseek_tf.load(run.path)
    assert bf16.embedding.embeddings.dtype == "bfloat16"
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    ours = np.asarray(bf16(ids), np.float32)
    assert rel_err(ours, hf_logits(native, ids)) < 0.05
    assert rel_err(ours, hf_logits(widened, ids)) < 0.05
    np.testing.assert_array_equal(  # no float32 round trip: the stored bits, as they were
        bf16.blocks[1].ffn.experts_up.numpy()[3].T.view(np.uint16),
        CheckpointReader(tmp_path / "hf")
        .get("model.layers.1.mlp.experts.3.up_proj.weight", bf16.embedding.embeddings.numpy().dtype)
        .view(np.uint16),
    )
