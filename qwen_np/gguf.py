"""GGUF checkpoints (llama.cpp, Ollama, LM Studio): weights, config and tokenizer from one file.

A GGUF file is: a header, key/value metadata (the config and the tokenizer, under llama.cpp's
key names such as `qwen2.block_count` or `tokenizer.ggml.tokens`), a table of tensors (name,
dims, type, offset), then the tensor data. `read_gguf` parses it (its layout is drawn above
`parse_gguf`); then:

1. the config, rebuilt from the metadata as a config.json-style dict (`config_from_gguf`);
2. every tensor dequantized to float32 by our own NumPy dequantizers (one per block type,
   each with its block layout in a comment; with low_memory the matrices are then rounded to
   bfloat16), renamed onto the Hugging Face params tree, and shape-checked by
   `weights.expected_shapes`, exactly like a safetensors checkpoint;
3. a byte-level BPE `tokenizers.Tokenizer` built from the vocabulary and merges in the metadata.

Two facts about the format the code depends on:
- GGUF lists a tensor's dims fastest-varying first (`ne`), the reverse of a NumPy shape: a
  `[out, in]` weight is stored with dims `[in, out]`.
- llama.cpp's converter reorders the q/k projection rows of the `llama` architecture for its
  interleaved RoPE; `unpermute_rope_rows` puts them back for our rotate-half RoPE.
"""

import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import QwenNPError, check_values, config_from_dict, is_int
from .memory import check_fits
from .ops import bf16_to_float32
from .weights import (as_rows, build_tree, expected_shapes, float32_to_bf16, map_file, multiplied_by_columns,
                      qwen2_pre_tokenization, row_blocks, weight_array)

# GGUF architecture name -> our model_type (config.json's name for the family)
ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                 "llama": "llama"}

# ---------------------------------------------------------------------------------------------
# Dequantizers. Each takes the raw blocks of a tensor, [N, bytes per block] uint8, and returns
# their values, [N, values per block] float32. All scales are little-endian float16.
# "Legacy" quants hold 32 values per block with one scale (d) and sometimes a minimum (m);
# K-quants hold 256 values per super-block, split into sub-blocks with their own small scales.


def f16(blocks, start):  # [N, bytes] uint8 -> [N, 1] float32: the float16 at byte `start` of each block
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def nibbles(qs):  # [N, 16] uint8 -> [N, 32]: value j in the low nibble of byte j, value j+16 in the high
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequantize_f32(blocks):  # [N, 4] -> [N, 1]
    return blocks.view(np.float32).copy()


def dequantize_f16(blocks):  # [N, 2] -> [N, 1]
    return blocks.view(np.float16).astype(np.float32)


def dequantize_bf16(blocks):  # [N, 2] -> [N, 1]
    return bf16_to_float32(blocks.view(np.uint16))


def dequantize_q8_0(blocks):  # [N, 34] -> [N, 32]
    # d (f16) | 32 int8 values: x = d * q
    return f16(blocks, 0) * blocks[:, 2:].view(np.int8)


def dequantize_q4_0(blocks):  # [N, 18] -> [N, 32]
    # d (f16) | 16 bytes of 4-bit values: x = d * (q - 8)
    return f16(blocks, 0) * (nibbles(blocks[:, 2:]).astype(np.int8) - 8)


def dequantize_q4_1(blocks):  # [N, 20] -> [N, 32]
    # d (f16) | m (f16) | 16 bytes of 4-bit values: x = d * q + m
    return f16(blocks, 0) * nibbles(blocks[:, 4:]) + f16(blocks, 2)


def fifth_bits(qh, qs):  # [N, 4] uint8, [N, 16] uint8 -> [N, 32] 5-bit values
    # qh is a little-endian u32 whose bit j is the fifth bit of value j.
    return nibbles(qs) | (np.unpackbits(qh, axis=-1, bitorder="little") << 4)


def dequantize_q5_0(blocks):  # [N, 22] -> [N, 32]
    # d (f16) | qh (4 bytes: the fifth bits) | 16 bytes of low nibbles: x = d * (q - 16)
    return f16(blocks, 0) * (fifth_bits(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - 16)


def dequantize_q5_1(blocks):  # [N, 24] -> [N, 32]
    # d (f16) | m (f16) | qh (4 bytes) | 16 bytes of low nibbles: x = d * q + m
    return f16(blocks, 0) * fifth_bits(blocks[:, 4:8], blocks[:, 8:]) + f16(blocks, 2)


def bit_planes(qs, bits):  # [N, B] uint8 -> [N, B * 8 / bits]
    # Each group of 32 bytes holds 256 / bits values: plane s (bits s*bits .. s*bits+bits-1) of
    # byte l is value 32*s + l of that group. The K-quants pack their 4-, 2- and 1-bit parts so.
    N = qs.shape[0]
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    planes = (qs.reshape(N, -1, 1, 32) >> shifts) & ((1 << bits) - 1)  # [N, groups, 8 / bits, 32]
    return planes.reshape(N, -1)


def dequantize_q2_k(blocks):  # [N, 84] -> [N, 256]
    # scales (16 bytes: low nibble scale, high nibble min, one per 16 values) | 64 bytes of
    # 2-bit values (two groups of 32 bytes, 4 planes each) | d (f16) | dmin (f16)
    N = blocks.shape[0]
    scales, d, dmin = blocks[:, :16], f16(blocks, 80), f16(blocks, 82)
    q = bit_planes(blocks[:, 16:80], 2).reshape(N, 16, 16)  # [N, sub-block, value]
    x = (d * (scales & 0x0F))[..., None] * q - (dmin * (scales >> 4))[..., None]
    return x.reshape(N, 256)


def dequantize_q3_k(blocks):  # [N, 110] -> [N, 256]
    # hmask (32 bytes: the third bit, 8 planes) | 64 bytes of 2-bit values (as in Q2_K) |
    # 12 bytes of sixteen 6-bit signed scales | d (f16). x = d * (scale - 32) * q, where
    # q = low two bits, minus 4 when the hmask bit is clear.
    N = blocks.shape[0]
    low, high = bit_planes(blocks[:, 32:96], 2), bit_planes(blocks[:, :32], 1)
    q = low.astype(np.int8) - 4 * (1 - high.astype(np.int8))  # [N, 256]
    s = blocks[:, 96:108]
    # Scale j: low 4 bits in byte j % 8 (low nibble for j < 8, high for j >= 8), high 2 bits in
    # byte 8 + j % 4 at bit 2 * (j // 4).
    scale_low = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=-1)  # [N, 16]
    scale_high = ((s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3).reshape(N, 16)
    scale = (scale_low | (scale_high << 4)).astype(np.int8) - 32
    x = (f16(blocks, 108) * scale)[..., None] * q.reshape(N, 16, 16)
    return x.reshape(N, 256)


def k_scales_mins(s):  # [N, 12] uint8 -> [N, 8], [N, 8]: the 6-bit scales and mins of Q4_K and Q5_K
    # Sub-blocks 0-3: scale = s[j] & 63, min = s[j+4] & 63. Sub-blocks 4-7: the low 4 bits come
    # from s[j+4] (scale low nibble, min high nibble), the top 2 bits from the top of s[j-4], s[j].
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=-1)
    return scales, mins


def dequantize_q4_k(blocks):  # [N, 144] -> [N, 256]
    # d (f16) | dmin (f16) | 12 bytes of 6-bit scales and mins | 128 bytes of 4-bit values:
    # 4 chunks of 32 bytes, the low nibbles of chunk c are sub-block 2c, the high ones 2c+1.
    # x = d * scale * q - dmin * min, per sub-block of 32 values.
    N = blocks.shape[0]
    scales, mins = k_scales_mins(blocks[:, 4:16])
    q = bit_planes(blocks[:, 16:], 4).reshape(N, 8, 32)
    x = (f16(blocks, 0) * scales)[..., None] * q - (f16(blocks, 2) * mins)[..., None]
    return x.reshape(N, 256)


def dequantize_q5_k(blocks):  # [N, 176] -> [N, 256]
    # As Q4_K, plus qh (32 bytes) after the scales: bit j of qh[l] is the fifth bit of value l
    # of sub-block j.
    N = blocks.shape[0]
    scales, mins = k_scales_mins(blocks[:, 4:16])
    q = bit_planes(blocks[:, 48:], 4) | (bit_planes(blocks[:, 16:48], 1) << 4)
    x = (f16(blocks, 0) * scales)[..., None] * q.reshape(N, 8, 32) - (f16(blocks, 2) * mins)[..., None]
    return x.reshape(N, 256)


def dequantize_q6_k(blocks):  # [N, 210] -> [N, 256]
    # ql (128 bytes: low 4 bits) | qh (64 bytes: high 2 bits) | 16 int8 scales | d (f16).
    # Two halves of 128 values; in half h, value i's low nibble is in ql[64h + i % 64] (low
    # nibble for i < 64, high for i >= 64) and its high bits in plane i // 32 of qh[32h + i % 32].
    # x = d * scale * (q - 32), one scale per 16 values.
    N = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    low = ((ql.reshape(N, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(N, 256)
    q = (low | (bit_planes(qh, 2) << 4)).astype(np.int8) - 32
    scale = blocks[:, 192:208].view(np.int8)
    x = (f16(blocks, 208) * scale)[..., None] * q.reshape(N, 16, 16)
    return x.reshape(N, 256)


# The "IQ4" quants index a fixed non-linear grid of 16 levels instead of spacing them evenly:
# the levels crowd near zero, where most weights are. llama.cpp also writes IQ4_NL for the
# Q2_K and Q3_K tensors whose rows are not a multiple of 256 (Qwen2.5-0.5B's 896).
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def dequantize_iq4_nl(blocks):  # [N, 18] -> [N, 32]
    # d (f16) | 16 bytes of 4-bit indices, packed as Q4_0's values: x = d * IQ4_LEVELS[q]
    return f16(blocks, 0) * IQ4_LEVELS[nibbles(blocks[:, 2:])]


def dequantize_iq4_xs(blocks):  # [N, 136] -> [N, 256]
    # d (f16) | scales_h (u16) | scales_l (4 bytes) | 8 sub-blocks of 32 values, 16 bytes each, as IQ4_NL's.
    # Sub-block j has a 6-bit scale: its low 4 bits are nibble j of scales_l (low nibble first),
    # its high 2 bits are bits 2j, 2j+1 of scales_h. x = d * (scale - 32) * IQ4_LEVELS[q]
    N = blocks.shape[0]
    low = np.stack([blocks[:, 4:8] & 0x0F, blocks[:, 4:8] >> 4], axis=-1).reshape(N, 8)  # [N, 8]
    high = (blocks[:, 2:4].view(np.uint16) >> np.arange(0, 16, 2, dtype=np.uint16)) & 3  # [N, 8]
    scale = (low | (high << 4)).astype(np.float32) - 32  # [N, 8]
    q = IQ4_LEVELS[nibbles(blocks[:, 8:].reshape(N * 8, 16))].reshape(N, 8, 32)  # [N, 8, 32]
    x = (f16(blocks, 0) * scale)[..., None] * q  # [N, 8, 32]
    return x.reshape(N, 256)


# ggml type name -> (values per block, bytes per block, dequantizer)
DEQUANTIZERS = {
    "F32": (1, 4, dequantize_f32), "F16": (1, 2, dequantize_f16), "BF16": (1, 2, dequantize_bf16),
    "Q8_0": (32, 34, dequantize_q8_0), "Q4_0": (32, 18, dequantize_q4_0), "Q4_1": (32, 20, dequantize_q4_1),
    "Q5_0": (32, 22, dequantize_q5_0), "Q5_1": (32, 24, dequantize_q5_1),
    "Q2_K": (256, 84, dequantize_q2_k), "Q3_K": (256, 110, dequantize_q3_k), "Q4_K": (256, 144, dequantize_q4_k),
    "Q5_K": (256, 176, dequantize_q5_k), "Q6_K": (256, 210, dequantize_q6_k),
    "IQ4_NL": (32, 18, dequantize_iq4_nl), "IQ4_XS": (256, 136, dequantize_iq4_xs),
}


def dequantize(raw, type_name, shape, bf16=False, by_columns=False):  # raw bytes -> [shape] float32
    # bf16: the values rounded to bfloat16 (uint16 bits), for load(..., low_memory=True).
    # by_columns: a float32 matrix laid out column by column (see weights.weight_array).
    values, block_bytes, dequantizer = DEQUANTIZERS[type_name]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, block_bytes)
    out = weight_array(shape, np.uint16 if bf16 else np.float32, by_columns)
    rows = as_rows(out)
    per_row = rows.shape[1] // values  # blocks a row (a block never straddles two rows)
    for start, stop in row_blocks(rows):  # a float32 temporary of at most 16 MB, however large the tensor
        x = dequantizer(blocks[start * per_row:stop * per_row]).reshape(stop - start, -1)
        rows[start:stop] = float32_to_bf16(x) if bf16 else x
    return out


# ---------------------------------------------------------------------------------------------
# Reading the file. Everything is little-endian; a string is its length (u64) then its UTF-8 bytes.
#
#   "GGUF" | version (u32: 2 or 3) | tensor count (u64) | metadata count (u64)
#   metadata, each: key (string) | value type (u32) | value
#       an array value: item type (u32) | count (u64) | the items
#   tensor table, each: name (string) | n_dims (u32) | dims (u64 each, fastest-varying first)
#       | ggml type (u32) | offset (u64) of its data, from the start of the data section
#   padding to general.alignment (default 32) | the data section

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9  # the other two value types
GGML_TYPES = {  # ggml's type numbers, for the tensor table (those qwen_np reads are in DEQUANTIZERS)
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}
MAX_NESTING = 16  # arrays of arrays: real files nest at most once
MAX_DIMS = 4  # ggml's tensors have at most 4 dims


class Tensor(NamedTuple):  # one entry of the tensor table
    name: str
    type_name: str  # the ggml type: "Q4_K", "F32", ... ("99" for a number ggml does not have)
    dims: tuple  # fastest-varying first: dims[0] is the length of a row (numpy_shape reverses them)
    data: object  # its raw bytes, a uint8 view of the mapped file (None for a type qwen_np cannot read)


class Corrupt(Exception):  # what read_gguf turns into "FILE is truncated or corrupt: ..."
    pass


class Cursor:
    """Reads values one after the other from the mapped file, refusing any read past its end."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def take(self, size):  # -> the offset of the next `size` bytes, and moves past them
        if size > len(self.buffer) - self.pos:
            raise Corrupt(f"a value at byte {self.pos:,} runs past the end of the file")
        self.pos += size
        return self.pos - size

    def scalar(self, fmt):
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        size = self.scalar("<Q")
        start = self.take(size)
        return self.buffer[start:start + size].decode("utf-8")

    def value(self, kind, depth=0):  # -> a metadata value: int, float, bool, str or list
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise Corrupt(f"unknown metadata value type {kind} at byte {self.pos - 4:,}")
        if depth == MAX_NESTING:
            raise Corrupt(f"arrays nested more than {MAX_NESTING} deep")
        item, count = self.scalar("<I"), self.scalar("<Q")
        if item in SCALARS:  # a numeric array: one read
            start = self.take(count * struct.calcsize(SCALARS[item]))
            return np.frombuffer(self.buffer, SCALARS[item], count, start).tolist()
        if count > (len(self.buffer) - self.pos) // 8:  # each string or array takes 8 bytes at least
            raise Corrupt(f"an array of {count:,} items at byte {self.pos:,} runs past the end of the file")
        return [self.value(item, depth + 1) for _ in range(count)]


def round_up(n, multiple):  # -> the smallest multiple of `multiple` that is >= n
    return -(-n // multiple) * multiple


def parse_gguf(buffer):  # -> {key: value}, {name: Tensor}; raises Corrupt
    cursor = Cursor(buffer)
    cursor.take(8)  # "GGUF" and the version, checked by the caller
    tensor_count, metadata_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata = {}
    for _ in range(metadata_count):
        key = cursor.string()
        if key in metadata:
            raise Corrupt(f"the metadata key {key!r} appears twice")
        metadata[key] = cursor.value(cursor.scalar("<I"))
    table = {}
    for _ in range(tensor_count):
        name = cursor.string()
        if name in table:
            raise Corrupt(f"the tensor {name!r} appears twice")
        n_dims = cursor.scalar("<I")
        if n_dims > MAX_DIMS:
            raise Corrupt(f"the tensor {name!r} has {n_dims:,} dims (GGUF allows {MAX_DIMS})")
        dims = tuple(cursor.scalar("<Q") for _ in range(n_dims))
        table[name] = (cursor.scalar("<I"), dims, cursor.scalar("<Q"))
    alignment = metadata.get("general.alignment", 32)
    if not is_int(alignment) or alignment < 1 or alignment & (alignment - 1):  # as llama.cpp requires
        raise Corrupt(f"general.alignment={alignment!r} is not a power of two")
    data_start = round_up(cursor.pos, alignment)  # the table's end, padded to the alignment
    tensors, expected, before = {}, 0, None  # where the next tensor's data must start (None: unknown, after
    for name, (number, dims, offset) in table.items():  # an unreadable type), and the tensor before it
        if expected is not None and offset != expected:  # llama.cpp's rule: each tensor's data follows the
            # one before it in the table, padded to the alignment; anything else overlaps or leaves a gap
            where = "the start of the data section" if before is None else \
                f"where the data of {before!r} ends, padded to {alignment} bytes"
            raise Corrupt(f"tensor {name!r} has offset {offset:,}, expected {expected:,} ({where})")
        type_name = GGML_TYPES.get(number, str(number))
        data = tensor_bytes(buffer, name, type_name, dims, data_start + offset)
        tensors[name] = Tensor(name, type_name, dims, data)
        expected = None if data is None else offset + round_up(data.size, alignment)
        before = name
    return metadata, tensors


def tensor_bytes(buffer, name, type_name, dims, start):  # -> [bytes] uint8 view of the file (None: unreadable type)
    if type_name not in DEQUANTIZERS:
        return None  # refused if the model uses it (gguf_params), with the type named
    values, block_bytes, _ = DEQUANTIZERS[type_name]
    row = dims[0] if dims else 1  # a block never straddles two rows
    if row % values:
        raise Corrupt(f"tensor {name!r} has rows of {row:,} values, not a whole number of {type_name} blocks of "
                      f"{values}")
    size = math.prod(dims) // values * block_bytes
    if start + size > len(buffer):
        raise Corrupt(f"the data of tensor {name!r} (bytes {start:,} to {start + size:,}) runs past the end of the "
                      f"file")
    return np.frombuffer(buffer, np.uint8, size, start)


def read_gguf(path):  # -> {metadata key: value}, {tensor name: Tensor}
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise QwenNPError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    if len(head) < 8:
        raise QwenNPError(f"{path} ({len(head)} bytes) is truncated: it ends inside the GGUF header")
    version = int.from_bytes(head[4:], "little")
    if (version & 0xFFFF) == 0 and version:  # a small number written big-endian
        raise QwenNPError(f"{path} is a big-endian GGUF file; qwen_np reads little-endian files only")
    if version not in (2, 3):
        raise QwenNPError(f"{path} is a GGUF file of version {version}; qwen_np reads versions 2 and 3")
    try:
        metadata, tensors = parse_gguf(map_file(path))
    except Corrupt as e:
        raise QwenNPError(f"{path} ({path.stat().st_size:,} bytes) is truncated or corrupt: {e}") from None
    except UnicodeDecodeError as e:
        raise QwenNPError(f"{path}: a metadata string is not valid UTF-8 ({e})") from None
    parts, number = metadata.get("split.count", 1), metadata.get("split.no")
    if parts != 1:  # llama.cpp's gguf-split: the tensors are spread over several files
        part = f"part {number + 1}" if is_int(number) else "a part"
        raise QwenNPError(f"{path} is {part} of a GGUF split into {parts} files; qwen_np reads one-file GGUFs: "
                          f"join the parts first with llama.cpp's llama-gguf-split --merge FIRST-PART.gguf JOINED.gguf")
    return metadata, tensors


def numpy_shape(tensor):  # GGUF dims are fastest-varying first: reverse them for NumPy
    return tuple(int(n) for n in reversed(tensor.dims))


def config_from_gguf(metadata, tensors, path):
    """The Config of a GGUF file: its metadata renamed to config.json's keys, then the usual reader."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise QwenNPError(f"{path}: unsupported GGUF architecture {arch!r}; "
                          f"qwen_np reads {', '.join(ARCHITECTURES)}")
    model_type = ARCHITECTURES[arch]

    def key(name, default=KeyError):
        if f"{arch}.{name}" in metadata:
            return metadata[f"{arch}.{name}"]
        if default is KeyError:
            raise QwenNPError(f"{path}: the metadata has no {arch}.{name}")
        return default

    def count(name):  # a size the code below computes with: checked here, the rest by config_from_dict
        value = key(name)
        if not is_int(value, 1):
            raise QwenNPError(f"{path}: the metadata's {arch}.{name} must be a positive integer, got {value!r}")
        return value

    if "token_embd.weight" not in tensors or len(numpy_shape(tensors["token_embd.weight"])) != 2:
        raise QwenNPError(f"{path}: no 2-D token_embd.weight tensor (the token embeddings)")
    hidden, heads = count("embedding_length"), count("attention.head_count")
    if f"{arch}.attention.key_length" not in metadata and hidden % heads:
        raise QwenNPError(f"{path}: {arch}.attention.head_count={heads} does not divide {arch}.embedding_length="
                          f"{hidden}, and the file gives no {arch}.attention.key_length (the head size)")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise QwenNPError(f"{path}: RoPE on {key('rope.dimension_count')} of {head_dim} head dimensions "
                          f"(partial rotary) is not supported")
    has_bias = "blk.0.attn_q.bias" in tensors
    raw = {
        "model_type": model_type,
        "vocab_size": numpy_shape(tensors["token_embd.weight"])[0],  # the embedding rows, as in config.json
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length", 0),  # absent when every layer is sparse
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length", 32768),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling_from_gguf(key, path),
        "tie_word_embeddings": "output.weight" not in tensors,  # llama.cpp writes `output` only when untied
        "qkv_bias": has_bias, "attention_bias": has_bias,  # the name Qwen2(-MoE) uses, and the others'
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if model_type.endswith("_moe"):
        check_values(raw, str(path))  # before the per-layer list below: a corrupt block_count may be 2**64
        top_k = key("expert_used_count")
        raw.update({
            "num_experts": key("expert_count"),
            "num_experts_per_tok": top_k,
            # Sizes a file may leave out, derived as llama.cpp derives them: the experts' from
            # feed_forward_length / expert_used_count, Qwen2-MoE's shared expert's as feed_forward_length.
            "moe_intermediate_size": key("expert_feed_forward_length",
                                         raw["intermediate_size"] // top_k if is_int(top_k, 1) else None),
            "shared_expert_intermediate_size": key("expert_shared_feed_forward_length", raw["intermediate_size"])
            if model_type == "qwen2_moe" else 0,
            # llama.cpp renormalises the top-k weights for Qwen3-MoE and not for Qwen2-MoE, whatever the
            # file's expert_weights_norm says (it reads that key for other architectures only).
            "norm_topk_prob": model_type == "qwen3_moe",
            # GGUF has no mlp_only_layers: a layer is sparse when the file holds its router.
            "mlp_only_layers": [i for i in range(raw["num_hidden_layers"])
                                if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
        })
    return config_from_dict(raw, source=str(path))


def rope_scaling_from_gguf(key, path):  # -> config.json's rope_scaling dict, or None
    # As llama.cpp reads it: the type defaults to linear, the factor may be under its older name
    # rope.scale_linear (none, 0 or 1: no scaling), YaRN's original length defaults to context_length.
    factor = key("rope.scaling.factor", None) or key("rope.scale_linear", None)
    kind = key("rope.scaling.type", "linear")
    if kind == "none" or (kind == "linear" and factor in (None, 1)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        rope = {"rope_type": "yarn", "factor": factor if factor is not None else key("rope.scaling.factor"),
                "original_max_position_embeddings": key("rope.scaling.original_context_length",
                                                        key("context_length", 32768))}
        for name in ("beta_fast", "beta_slow"):
            if key(f"rope.scaling.yarn_{name}", None) is not None:
                rope[name] = key(f"rope.scaling.yarn_{name}")
        return rope
    raise QwenNPError(f"{path}: unsupported RoPE scaling {kind!r}; qwen_np reads none, linear and yarn")


# ---------------------------------------------------------------------------------------------
# Tensor names: GGUF -> Hugging Face

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {  # blk.N.<key> -> model.layers.N.<value>
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the MoE router
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
EXPERT_NAMES = {  # one 3-D tensor [E, out, in] holding every expert's matrix
    "ffn_gate_exps.weight": "gate_proj.weight", "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}


def hf_names(gguf_name, num_experts, path):  # -> [(HF name, expert index or None)]
    if gguf_name in GLOBAL_NAMES:
        return [(GLOBAL_NAMES[gguf_name], None)]
    block, _, rest = gguf_name.partition(".")[2].partition(".")
    if gguf_name.startswith("blk.") and block.isdigit():
        if rest in LAYER_NAMES:
            return [(f"model.layers.{block}.{LAYER_NAMES[rest]}", None)]
        if rest in EXPERT_NAMES and num_experts:
            return [(f"model.layers.{block}.mlp.experts.{e}.{EXPERT_NAMES[rest]}", e) for e in range(num_experts)]
    raise QwenNPError(f"{path}: unexpected tensor {gguf_name!r} (not part of the models qwen_np reads)")


def unpermute_rope_rows(w, num_heads):  # [num_heads * Dh, ...] -> [num_heads * Dh, ...]
    # llama.cpp's converter reorders each head's rows of the llama q/k projections from the
    # rotate-half pairing (row i with i + Dh/2) to the interleaved one (row 2i with 2i + 1):
    # row 2i + j of a head holds original row j * Dh/2 + i. Reading [half, 2] as [2, half] undoes it.
    return w.reshape(num_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_params(tensors, config, path, low_memory=False):
    """The params tree of a GGUF file, every tensor float32 and shape-checked against the config.
    low_memory: matrices (2-D, and the stacked experts) are kept as bfloat16 bits instead, as from
    a safetensors checkpoint: each is dequantized to float32 a chunk at a time, then rounded."""
    shapes = expected_shapes(config)
    plan = {}  # HF name -> (GGUF tensor, expert index or None)
    for gguf_name, tensor in tensors.items():
        for name, expert in hf_names(gguf_name, config.num_experts, path):
            if name not in shapes:
                raise QwenNPError(f"{path}: tensor {gguf_name!r} ({name}) is not part of this {config.model_type} "
                                  f"config")
            plan[name] = (tensor, expert)
    missing = [name for name in shapes if name not in plan]
    if missing:
        raise QwenNPError(f"{path}: missing tensor(s) {', '.join(missing[:5])} (the config calls for them)")

    wanted = {}  # HF name -> the shape of its GGUF tensor (for an expert, that of all experts stacked)
    for name, (tensor, expert) in plan.items():
        wanted[name] = shapes[name] if expert is None else (config.num_experts, *shapes[name])
        found = numpy_shape(tensor)
        if [n for n in found if n != 1] != [n for n in wanted[name] if n != 1]:
            # Only dims of size 1 may differ: llama.cpp stores the [1, D] shared-expert gate as [D].
            raise QwenNPError(f"{path}: tensor {tensor.name!r} has shape {list(found)} but the config implies "
                              f"{list(wanted[name])} ({name})")
    # Each GGUF tensor is dequantized once (an expert tensor for all its experts), by one thread
    # per core (at most 8): the dequantizers' NumPy operations release the GIL.
    reads, is_matrix = {}, {}  # GGUF name -> (tensor, kept in bfloat16, laid out by columns); -> 2-D in the tree
    for name, (tensor, expert) in plan.items():
        if tensor.type_name not in DEQUANTIZERS:  # refused before any tensor is read
            raise QwenNPError(f"{path}: tensor {tensor.name!r} has type {tensor.type_name}, which qwen_np cannot "
                              f"read (it reads {', '.join(DEQUANTIZERS)})")
        is_matrix[tensor.name] = len(shapes[name]) == 2  # an expert's matrix too, stacked in the file
        reads[tensor.name] = (tensor, low_memory and is_matrix[tensor.name],
                              not low_memory and expert is None and multiplied_by_columns(name, wanted))

    def needed(low):  # -> bytes of memory the weights take, loaded with low_memory=low
        return sum(math.prod(read[0].dims) * (2 if low and is_matrix[name] else 4) for name, read in reads.items())

    check_fits(path, needed(low_memory), needed(True), low_memory)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(dequantize_tensor, *read) for name, read in reads.items()}
        arrays = {name: future.result() for name, future in futures.items()}
    flat = {}
    for name, (tensor, expert) in plan.items():
        # An expert is a view of the stacked [E, out, in] array (reshaped first: dims of size 1 may differ).
        value = arrays[tensor.name] if expert is None else arrays[tensor.name].reshape(wanted[name])[expert]
        flat[name] = value.reshape(shapes[name])
    if config.model_type == "llama":
        for i in range(config.num_hidden_layers):
            for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
                for kind in ("weight", "bias"):
                    name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                    if name in flat:
                        flat[name] = unpermute_rope_rows(flat[name], heads)
    return build_tree(flat)


def dequantize_tensor(tensor, bf16, by_columns):  # -> the tensor's array of its NumPy shape (see dequantize)
    return dequantize(tensor.data, tensor.type_name, numpy_shape(tensor), bf16, by_columns)


# ---------------------------------------------------------------------------------------------
# The tokenizer: byte-level BPE from tokenizer.ggml.* metadata

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's enum)

PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> family, as llama.cpp groups them ("gpt2": a file with no pre)
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "smollm": "starcoder", "starcoder": "starcoder",
    "gpt-2": "gpt2", "gpt2": "gpt2",
}


def pre_tokenizer(pre, path):  # -> (normalizer or None, pre-tokenizer)
    from tokenizers import pre_tokenizers
    family = PRE_TOKENIZERS.get(pre) if isinstance(pre, str) else None
    if family == "qwen2":  # as Qwen's tokenizer.json: NFC, Qwen's split, then bytes to symbols
        return qwen2_pre_tokenization()
    if family == "starcoder":  # SmolLM, StarCoder: every digit alone, then GPT-2's split
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if family == "gpt2":  # GPT-2's split, built into the ByteLevel pre-tokenizer
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise QwenNPError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre = {pre!r}; "
                      f"qwen_np knows {', '.join(PRE_TOKENIZERS)}")


def bytes_to_unicode():  # {byte: symbol}: GPT-2's byte-level alphabet
    # Printable bytes stand for themselves; the others (space, control bytes...) get symbols from 256 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def gguf_tokenizer(metadata, path):
    """A `tokenizers.Tokenizer` from the metadata, or None when the file carries no vocabulary.
    The special token ids must have passed check_special_token_ids."""
    if "tokenizer.ggml.tokens" not in metadata:
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2" or "tokenizer.ggml.merges" not in metadata:
        raise QwenNPError(f"{path}: unsupported tokenizer {kind!r}; qwen_np builds byte-level BPE "
                          f"tokenizers ('gpt2', with merges)")
    check_vocabulary(metadata, path)
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Ordinary tokens are spelled in the byte-level alphabet (one that is not is respelled from its
    # UTF-8 bytes). Control and user-defined tokens are stored as their raw text, which may hold
    # characters outside it (DeepSeek-R1-Distill-Qwen's <｜User｜>, a user-defined token with a real
    # space): they keep that text, which llama.cpp matches whole in the input (see below).
    symbol = bytes_to_unicode()
    alphabet = set(symbol.values())
    added = {TOKEN_CONTROL, TOKEN_USER_DEFINED}
    vocab = {t if set(t) <= alphabet or kind in added else "".join(symbol[b] for b in t.encode("utf-8")): i
             for i, (t, kind) in enumerate(zip(tokens, types))}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    # Checked here: on a merge outside the vocabulary the tokenizers library raises a bare Exception
    # ("Token `x` out of vocabulary"), or panics where only the joined token is missing.
    for merge in merges:
        if len(merge) != 2 or merge[0] not in vocab or merge[1] not in vocab or merge[0] + merge[1] not in vocab:
            raise QwenNPError(f"{path}: the merge {' '.join(merge)!r} in tokenizer.ggml.merges does not join two "
                              f"tokens of the vocabulary into a third")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # Files older than tokenizer.ggml.pre (2024) get GPT-2's split, as transformers gives them.
    normalizer, tokenizer.pre_tokenizer = pre_tokenizer(metadata.get("tokenizer.ggml.pre", "gpt2"), path)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole and are special; user-defined ones
    # (<tool_call>, <think>, ...) are matched whole too but are ordinary text.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
                                  if kind == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
                          if kind == TOKEN_USER_DEFINED])
    bos, eos = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token")) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token")) and eos is not None
    if add_bos or add_eos:  # the file asks for BOS (or EOS) around every encoded text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=([tokens[bos]] if add_bos else []) + ["$A"] + ([tokens[eos]] if add_eos else []),
            special_tokens=[(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on])
    return tokenizer


def check_vocabulary(metadata, path):
    """The tokenizer metadata has the types llama.cpp writes (its special token ids: check_special_token_ids)."""
    def is_list(key, test):
        return isinstance(metadata.get(key), list) and all(map(test, metadata[key]))

    tokens = metadata["tokenizer.ggml.tokens"]
    if not is_list("tokenizer.ggml.tokens", lambda t: isinstance(t, str)) or not is_list(
            "tokenizer.ggml.merges", lambda m: isinstance(m, str)):
        raise QwenNPError(f"{path}: tokenizer.ggml.tokens and tokenizer.ggml.merges must be arrays of strings")
    if "tokenizer.ggml.token_type" in metadata and not (
            is_list("tokenizer.ggml.token_type", is_int) and len(metadata["tokenizer.ggml.token_type"]) == len(tokens)):
        raise QwenNPError(f"{path}: tokenizer.ggml.token_type must be an array of integers, one per token")


def check_special_token_ids(metadata, path):
    """The special token ids (bos, eos, padding, end of turn...) are integers >= 0, in the vocabulary where there
    is one."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    limit = len(tokens) if isinstance(tokens, list) else math.inf
    for key in ("bos", "eos", "padding", "eot", "eom", "fim_pad", "fim_rep", "fim_sep"):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not (is_int(i) and i < limit):
            vocabulary = f"a token id of the vocabulary (0..{limit - 1})" if limit < math.inf else "a token id"
            raise QwenNPError(f"{path}: tokenizer.ggml.{key}_token_id={i!r} is not {vocabulary}")


# The tokens llama.cpp ends generation at (its "EOG" set, llama-vocab.cpp) besides the file's eos:
# every token with one of these texts (Qwen's <|endoftext|> beside <|im_end|>; gpt-oss's <|return|>
# and <|call|> are left out with the architecture), and the end-of-turn, end-of-message and
# fill-in-the-middle padding / repository / file-separator tokens: the file's ids, or else a token
# with one of their texts.
END_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
             "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}
NAMED_END_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",)}


def end_token_ids_of_gguf(metadata):  # -> [int], the file's eos first: where llama.cpp stops generating
    texts = END_TEXTS.union(*NAMED_END_TEXTS.values())
    found = {}  # text -> id, of the tokens with one of those texts (one pass over the vocabulary)
    for i, token in enumerate(metadata.get("tokenizer.ggml.tokens", [])):
        if token in texts:
            found.setdefault(token, i)
    ends = [metadata.get("tokenizer.ggml.eos_token_id")]
    for key, named in NAMED_END_TEXTS.items():  # (llama.cpp takes any one token of the texts; here the first)
        ends.append(metadata.get(f"tokenizer.ggml.{key}_token_id", min((found[t] for t in named if t in found),
                                                                       default=None)))
    ends += sorted(found[t] for t in END_TEXTS if t in found)
    return list(dict.fromkeys(i for i in ends if i is not None))  # in order, each once


def chat_settings(metadata):  # -> tokenizer_config, generation_config as a checkpoint directory has them
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    ids = {name: metadata[f"tokenizer.ggml.{key}_token_id"]
           for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
           if f"tokenizer.ggml.{key}_token_id" in metadata}
    tokenizer_config = {f"{name}_token": tokens[i] for name, i in ids.items() if i < len(tokens)}
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    generation_config = {f"{name}_token_id": i for name, i in ids.items()}
    ends = end_token_ids_of_gguf(metadata)
    if ends:  # one id as the file gives it, several as a list (generation stops at each)
        generation_config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return tokenizer_config, generation_config


def load_gguf(path, low_memory=False):
    """(config, params, tokenizer, generation_config, tokenizer_config) of one .gguf file."""
    path = Path(path)
    metadata, tensors = read_gguf(path)
    config = config_from_gguf(metadata, tensors, path)
    check_special_token_ids(metadata, path)  # metadata only: before the weights are dequantized
    params = gguf_params(tensors, config, path, low_memory)
    tokenizer = gguf_tokenizer(metadata, path)  # checks the vocabulary, which chat_settings reads too
    tokenizer_config, generation_config = chat_settings(metadata)
    return config, params, tokenizer, generation_config, tokenizer_config
