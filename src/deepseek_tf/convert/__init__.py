"""Conversion between Hugging Face DeepSeek-V2/V3 checkpoints and deepseek-tf runs.

- `convert_from_hf(hf_dir, run_dir, dtype)`: config.json + safetensors (sharded,
  BF16/F16/F32 or block-FP8) -> `config.yaml` + checkpoint (+ tokenizer), tensor
  by tensor, in the checkpoint's dtype (bfloat16 or float32) by default.
- `convert_to_hf(run_dir, out_dir, dtype)`: the inverse, loadable by
  `transformers.AutoModelForCausalLM.from_pretrained`.
- `config_from_hf` / `hf_config_from`: the config mapping alone.

`deepseek_tf.api.conversion` offers the two conversions with the command's keywords
(`convert_from_hf(hf_dir, out=...)`, `convert_to_hf(run_dir, out=..., max_shard_size="5GB")`).
"""

from deepseek_tf.convert.hf import ConversionSummary, convert_from_hf, convert_to_hf
from deepseek_tf.convert.hf_config import config_from_hf, hf_config_from, read_hf_config
from deepseek_tf.convert.safetensors_io import (
    CheckpointReader,
    ConversionError,
    dequantize_fp8,
    quantize_fp8,
)
from deepseek_tf.convert.safetensors_writer import stream_checkpoint, write_checkpoint

__all__ = [
    "CheckpointReader",
    "ConversionError",
    "ConversionSummary",
    "config_from_hf",
    "convert_from_hf",
    "convert_to_hf",
    "dequantize_fp8",
    "hf_config_from",
    "quantize_fp8",
    "read_hf_config",
    "stream_checkpoint",
    "write_checkpoint",
]
