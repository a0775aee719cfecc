"""Writing safetensors checkpoints tensor by tensor (single file or sharded + index).

`safetensors.numpy.save_file` takes a whole dict of arrays: saving a model with it
holds a second copy of every weight (or of a whole shard) in memory. A safetensors
file is an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}` (plus `__metadata__`), padded with spaces
to 8 bytes, then the raw little-endian buffers in header order. Every offset
follows from the names, dtypes and shapes alone, so `stream_checkpoint` writes
the headers from a plan first and then each tensor's bytes as it is produced;
only one producer chunk (one tensor, as `convert_to_hf` makes them) is in memory
at a time. No library offers such a streaming writer, hence this one;
`CheckpointReader` reads the files back and `transformers` loads them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepseek_tf.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
)
from deepseek_tf.errors import ConversionError

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
METADATA = {"format": "pt"}  # transformers refuses safetensors files without a known format


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, numpy dtype and shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, a new shard whenever the next would pass `max_shard_bytes` (as
    `save_pretrained`); a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": METADATA}
    offset = 0
    for spec in shard:
        dtype = DTYPE_NAMES.get(np.dtype(spec.dtype))
        if dtype is None:
            raise ConversionError(f"{spec.name}: dtype {spec.dtype} has no safetensors name")
        header[spec.name] = {
            "dtype": dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _clear(directory: Path) -> None:
    for stale in (SINGLE_FILE, INDEX_FILE, "model-*-of-*.safetensors"):
        for path in directory.glob(stale):  # a previous export's files would shadow these
            path.unlink()


def stream_checkpoint(
    specs: list[TensorSpec],
    chunks: Iterable[Mapping[str, np.ndarray]],
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    single_file: str = SINGLE_FILE,
) -> list[Path]:
    """Writes the tensors of `specs` as `model.safetensors`, or as shards
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (a
    previous export's model files are removed first). `single_file` renames the
    unsharded file (and then nothing else in `directory` is touched).

    `chunks` yields dicts of arrays whose names follow `specs`' order (one
    tensor each keeps one in memory at a time); each array is written and dropped
    before the next chunk is asked for, and the producer is run to its end. Returns
    the files written.

    Raises:
        ConversionError: a chunk's tensor is not the next one planned, or its dtype
            or shape differ from the plan, or one is left over.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    if single_file != SINGLE_FILE and len(shards) > 1:
        raise ConversionError(f"{single_file}: a single file cannot exceed the shard size")
    if single_file == SINGLE_FILE:
        _clear(directory)
    names = (
        [single_file]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    pending = iter(chunks)
    buffered: list[tuple[str, np.ndarray]] = []
    for shard, file_name in zip(shards, names):
        with open(directory / file_name, "wb") as f:
            header = _header(shard)
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for spec in shard:
                while not buffered:
                    try:
                        buffered = list(next(pending).items())
                    except StopIteration:
                        raise ConversionError(f"{spec.name}: planned but never produced") from None
                name, value = buffered.pop(0)
                value = np.asarray(value)
                if name != spec.name or value.dtype != spec.dtype or value.shape != spec.shape:
                    raise ConversionError(
                        f"{name} {value.dtype}{list(value.shape)}: expected {spec.name} "
                        f"{np.dtype(spec.dtype)}{list(spec.shape)}"
                    )
                # raw bytes (little-endian, as every platform TensorFlow runs on)
                f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
                del value
    extra = buffered or list(next(pending, {}).items())  # also lets the producer finish
    if extra:
        raise ConversionError(f"{extra[0][0]}: produced but not planned")
    if len(shards) == 1:
        return [directory / single_file]
    weight_map = {spec.name: file_name for shard, file_name in zip(shards, names) for spec in shard}
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
        "weight_map": weight_map,
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [directory / n for n in names] + [directory / INDEX_FILE]


def write_checkpoint(
    tensors: Mapping[str, np.ndarray],
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    single_file: str = SINGLE_FILE,
) -> list[Path]:
    """Writes a dict of arrays (see `stream_checkpoint`)."""
    specs = [TensorSpec(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in tensors.items()]
    chunks = ({k: v} for k, v in tensors.items())
    return stream_checkpoint(specs, chunks, directory, max_shard_bytes, single_file)
