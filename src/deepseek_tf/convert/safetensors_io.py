"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded).

Reading parses the safetensors layout itself (an 8-byte little-endian header
length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then raw
little-endian buffers) and reads each tensor with one positioned read:
`safetensors`' numpy backend (0.8) returns BF16 through `ml_dtypes` but fails on
`F8_E4M3` (it looks for a `numpy.float8_e4m3fn` that numpy does not have), and
DeepSeek-V3 ships FP8. `ml_dtypes` (a TensorFlow dependency) supplies the
bfloat16/float8 numpy dtypes. Tensors are read lazily, one at a time, into
ordinary memory that is freed once assigned (a memory map would keep every page
read resident in the process: the checkpoint's whole size on top of the model's).
Writing is `safetensors_writer`'s.

FP8 weights (DeepSeek-V3's published format) are `weight` float8_e4m3fn plus a
float32 `weight_scale_inv` of one value per `weight_block_size` block (128 x 128);
`CheckpointReader.get` dequantises them: `w = fp8 * scale_inv[block]`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from deepseek_tf.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default max_shard_size ("5GB")
BLOCK_BYTES = 16 * 1024**2  # what `CheckpointReader.row_blocks` reads at a time

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class SafetensorsFile:
    """One `.safetensors` file: its header, read eagerly; tensors memory-mapped on demand.

    Args:
        path: the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, struct.error, ValueError) as e:
            raise ConversionError(f"{self.path.name}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: dict = header
        self._data_start = 8 + length
        self._bytes = None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor in its stored dtype (read from the file into a new array); with
        `rows=(start, stop)`, only those rows (first-axis indices)."""
        info = self.header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{name}: unsupported safetensors dtype {info['dtype']}")
        begin, end = (self._data_start + o for o in info["data_offsets"])
        shape = list(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > self._size():
            raise ConversionError(f"{name}: truncated or inconsistent data in {self.path.name}")
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        with open(self.path, "rb") as f:
            f.seek(begin)
            data = np.fromfile(f, dtype=np.uint8, count=end - begin)
        return data.view(dtype).reshape(shape)

    def _size(self) -> int:
        if self._bytes is None:
            self._bytes = self.path.stat().st_size
        return self._bytes


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Block-wise FP8 dequantisation: `weight[i, j] * scale_inv[i // bm, j // bn]` in float32."""
    bm, bn = block
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), bm, axis=0), bn, axis=1)
    rows, cols = weight.shape
    return weight.astype(np.float32) * scale[:rows, :cols]


def quantize_fp8(weight: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK):
    """Block-wise FP8 (e4m3) quantisation, the inverse of `dequantize_fp8`.

    Every `block` tile is divided by `scale = amax / 448` (448: float8_e4m3fn's
    largest value) and rounded to float8_e4m3fn. Returns `(fp8 weight, float32
    scale_inv)`; `scale_inv` has one value per tile, `ceil(shape / block)`.
    """
    bm, bn = block
    rows, cols = weight.shape
    grid = (-(-rows // bm), -(-cols // bn))
    padded = np.zeros((grid[0] * bm, grid[1] * bn), np.float32)
    padded[:rows, :cols] = weight
    tiles = padded.reshape(grid[0], bm, grid[1], bn)
    amax = np.abs(tiles).max(axis=(1, 3))  # (grid0, grid1)
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    scaled = tiles / scale[:, None, :, None]
    fp8 = scaled.reshape(padded.shape)[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return fp8, scale


class CheckpointReader:
    """All tensors of a Hugging Face checkpoint directory, FP8 weights dequantised.

    Reads `model.safetensors`, or `model.safetensors.index.json` and the shards
    it lists. `names()` hides the `*_scale_inv` companions of FP8 weights.

    Args:
        directory: the checkpoint directory.
        block_size: FP8 block shape (`quantization_config.weight_block_size`).
    """

    def __init__(self, directory: str | Path, block_size: tuple[int, int] = DEFAULT_BLOCK):
        self.directory = Path(directory)
        self.block_size = tuple(block_size)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        index = self.directory / INDEX_FILE
        if index.is_file():
            for name, file_name in self._read_index(index).items():
                self._where[name] = self._open(file_name, f"listed in {INDEX_FILE}")
                if name not in self._where[name].header:
                    raise ConversionError(f"{name}: listed in {INDEX_FILE} but not in {file_name}")
        elif (self.directory / SINGLE_FILE).is_file():
            single = self._open(SINGLE_FILE, "")
            self._where = dict.fromkeys(single.header, single)
        else:
            raise ConversionError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} "
                "(only safetensors checkpoints are supported)"
            )
        self._check_fp8_pairs()

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{INDEX_FILE}: malformed ({e!r})") from None
        if not isinstance(weight_map, Mapping):
            raise ConversionError(f"{INDEX_FILE}: weight_map is not a mapping")
        return dict(weight_map)

    def _open(self, file_name, why: str) -> SafetensorsFile:
        path = self._inside(file_name, why)
        if file_name not in self._files:
            if not path.is_file():
                raise ConversionError(f"{file_name}: missing ({why})")
            self._files[file_name] = SafetensorsFile(path)
        return self._files[file_name]

    def _inside(self, file_name, why: str) -> Path:
        """`directory / file_name`, refusing a name that leaves the model directory (an
        absolute path, `..`, a link pointing elsewhere) or is not a plain string."""
        if not isinstance(file_name, str) or not file_name or "\x00" in file_name:
            raise ConversionError(f"{INDEX_FILE}: file name {file_name!r} is not a file name")
        relative = Path(file_name)
        resolved = (self.directory / relative).resolve()
        inside = resolved.is_relative_to(self.directory.resolve())
        if relative.is_absolute() or ".." in relative.parts or not inside:
            raise ConversionError(
                f"{file_name}: {why or 'a shard'} points outside the model directory "
                f"{self.directory}"
            )
        return self.directory / file_name

    def _check_fp8_pairs(self) -> None:
        for name, file in self._where.items():
            if file.dtype(name) in FP8_DTYPES and name + SCALE_SUFFIX not in self._where:
                raise ConversionError(f"{name}: FP8 tensor without {name}{SCALE_SUFFIX}")
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in self._where:
                raise ConversionError(f"{name}: scale without its FP8 weight")

    def names(self) -> list[str]:
        """Tensor names, without the FP8 scale companions."""
        return [k for k in self._where if not self._is_scale(k)]

    def _is_scale(self, name: str) -> bool:
        base = name[: -len(SCALE_SUFFIX)]
        return name.endswith(SCALE_SUFFIX) and self._where[base].dtype(base) in FP8_DTYPES

    def __contains__(self, name: str) -> bool:
        return name in self._where and not self._is_scale(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def storage_dtype(self) -> str:
        """`"float32"` when every floating tensor is F32 (or F64), else `"bfloat16"`
        (BF16, F16 and FP8 checkpoints: DeepSeek publishes BF16 and FP8)."""
        floating = {f.dtype(k) for k, f in self._where.items() if not self._is_scale(k)}
        floating &= {"F64", "F32", "F16", "BF16", *FP8_DTYPES}
        return "float32" if floating <= {"F32", "F64"} else "bfloat16"

    def row_blocks(self, name: str, dtype=np.float32, block_bytes: int | None = None):
        """Yields `(first row, rows)` of tensor `name` in `dtype`, about `block_bytes` of
        the file at a time (an FP8 weight in one block, dequantised)."""
        file = self._where[name]
        shape, stored = file.shape(name), DTYPES.get(file.dtype(name))
        if stored is None or file.dtype(name) in FP8_DTYPES or not shape:
            yield 0, self.get(name, dtype)
            return
        row_bytes = max(1, math.prod(shape[1:]) * stored.itemsize)
        step = max(1, (block_bytes or BLOCK_BYTES) // row_bytes)
        for start in range(0, shape[0], step):
            rows = file.raw(name, (start, min(shape[0], start + step)))
            yield start, rows.astype(dtype, copy=False)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor `name` in `dtype` (FP8 weights dequantised with their `_scale_inv`;
        a tensor already stored in `dtype` is returned without a conversion copy)."""
        file = self._where[name]
        value = file.raw(name)
        if file.dtype(name) not in FP8_DTYPES:
            return value.astype(dtype, copy=False)
        scale_name = name + SCALE_SUFFIX
        scale = self._where[scale_name].raw(scale_name)
        if value.ndim != 2:
            raise ConversionError(f"{name}: FP8 tensor of shape {value.shape}, expected 2-D")
        bm, bn = self.block_size
        expected = (-(-value.shape[0] // bm), -(-value.shape[1] // bn))
        if tuple(scale.shape) != expected:
            raise ConversionError(
                f"{scale_name}: shape {tuple(scale.shape)}, expected {expected} "
                f"for {value.shape} in {bm}x{bn} blocks"
            )
        return dequantize_fp8(value, scale, self.block_size).astype(dtype, copy=False)
