"""qwen_np: the Qwen model family in pure NumPy, written to be read.

    model = qwen_np.load("path/to/checkpoint")
    logits, cache = qwen_np.forward(model.params, model.config, input_ids)
    for piece in qwen_np.generate_text(model, "The capital of France is", max_new_tokens=20):
        print(piece, end="")

The functions `generate` and `chat` exported here share their names with the modules that
define them; `from qwen_np.generate import top_k_filter` still reaches the module.
"""

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import download  # download.default_model_path(): the out-of-the-box model
from .config import Config, QwenNPError, is_int, is_present, read_config, read_json
from .hub import expanded, hub_cache, hub_cache_model, hub_hint, is_gguf_file, model_location  # where a model is
from .model import KVCache, forward
from .weights import load_params, load_tokenizer, read_text
from .generate import GenerationStats, Past, generate, generate_batch, generate_text
from .chat import chat, chat_ids, render_chat, split_thinking

__all__ = ["Model", "Config", "KVCache", "QwenNPError", "GenerationStats", "Past", "load", "forward", "generate",
           "generate_batch", "generate_text", "chat", "chat_ids", "render_chat", "split_thinking",
           "keep_freed_memory"]


@dataclass(frozen=True)
class Model:
    """What `load` returns: plain data, no behaviour."""
    config: Config
    params: dict  # nested dict/list tree mirroring the checkpoint's tensor names
    tokenizer: object  # a tokenizers.Tokenizer, or None when the checkpoint has none
    generation_config: dict  # generation_config.json, or {} when absent (GGUF: its bos/eos ids)
    tokenizer_config: dict  # tokenizer_config.json (+ chat_template.jinja), or {} (GGUF: template, bos/eos)
    path: Path


def load(path, mmap=False, low_memory=False):
    """Loads a checkpoint directory (config.json + safetensors [+ tokenizer files]) or a .gguf file.

    A Hub id such as "Qwen/Qwen3-0.6B" that is not a local path names that model's copy in the
    Hugging Face cache (`hub_cache()`), if it was downloaded there before; nothing is downloaded.

    mmap=True: float32 weights stay in the mapped file instead of being read into memory: loading
    returns at once and the first forward pass reads what it needs, as transformers does. The map
    is copy-on-write: a weight edited in place becomes this process's own; the file never changes.
    Decoding from the map was 1-25% slower in the README's measurements (Speed and memory), and
    the files must not be rewritten while the model is in use: reading a part of a file that was
    cut short kills the process (SIGBUS).

    low_memory=True: weight matrices are kept in bfloat16 (as uint16 bits: NumPy has no
    bfloat16), half the memory of float32, and widened to float32 a block at a time where they
    are used. A bf16 checkpoint keeps exactly its weights (widening is exact), and the results
    agree with the default's up to float rounding (a product taken a block at a time adds in
    another order); float32/fp16 weights, and the dequantized values of a GGUF file, are rounded
    to bfloat16. Decoding is slower than the default (see the README's Speed and memory).

    By default a weight matrix with more rows than columns, and short rows, is read into memory
    column by column (`ops.column_major`): the same [out, in] array to NumPy, which OpenBLAS
    streams faster in decoding. Mapped and bfloat16 weights keep the file's rows.

    Weights that cannot fit in the memory this process may still take (Linux's figures: see
    `memory.memory_room`) are refused before any is read, with the sizes named, instead of being
    read until the kernel kills the process.

    Loading also tells the C library to keep freed memory for reuse, a setting of the whole
    process (`keep_freed_memory`: glibc's mallopt; a forward pass is faster with it).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise QwenNPError(f"load takes the path of a checkpoint directory or .gguf file (a str or Path), or a "
                          f"Hub id, got {type(path).__name__}")
    if isinstance(path, str) and not path.strip():  # an unset variable, say: not the current directory
        raise QwenNPError(f"load: the model path is empty ({path!r})")
    for name, value in (("mmap", mmap), ("low_memory", low_memory)):
        if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):  # 0 and 1 as the same
            raise QwenNPError(f"load: {name} must be True or False, got {value!r}")
    keep_freed_memory()
    try:
        return read_model(str(path), mmap, low_memory)
    except OSError as e:  # a file that cannot be read: a directory in its place, a broken link, no permission
        raise QwenNPError(f"cannot read {e.filename or path}: {e.strerror or e}") from None


def read_model(name, mmap, low_memory):  # the body of `load`: name is the path as given
    path = model_location(name)
    if path is None:
        raise QwenNPError(f"{expanded(name)} does not exist{hub_hint(name)}")
    if is_gguf_file(path):
        if mmap:
            raise QwenNPError(f"{path}: mmap is for safetensors checkpoints; a GGUF file is always dequantized "
                              f"(into float32, or bfloat16 with low_memory=True)")
        from .gguf import load_gguf
        config, params, tokenizer, generation_config, tokenizer_config = load_gguf(path, low_memory)
        return Model(config=config, params=params, tokenizer=tokenizer, generation_config=generation_config,
                     tokenizer_config=tokenizer_config, path=path)
    if not path.is_dir():
        holder = f": pass the checkpoint directory that holds it, {path.parent}" if is_present(
            path.parent / "config.json") else ""
        raise QwenNPError(f"{path} is neither a checkpoint directory (config.json and *.safetensors) "
                          f"nor a GGUF file{holder}")
    config = read_config(path)
    tokenizer_config = read_json(path / "tokenizer_config.json") or {}
    if is_present(path / "chat_template.jinja"):  # newer checkpoints keep the template beside
        tokenizer_config = {**tokenizer_config, "chat_template": read_text(path / "chat_template.jinja")}
    return Model(config=config, params=load_params(path, config, mmap, low_memory),
                 tokenizer=load_tokenizer(path, config.model_type),
                 generation_config=read_json(path / "generation_config.json") or {},
                 tokenizer_config=tokenizer_config, path=path)


def keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=256 << 20):
    """Asks glibc's malloc to keep the memory of freed arrays for the next ones (no-op elsewhere).

    A forward pass allocates and frees temporaries of a few MB every step. By default glibc gives
    such blocks back to the kernel when they are freed (`munmap`, or trimming the heap), so the
    next array of the same size is new memory again: the kernel maps and zeroes it page by page,
    a page fault every 4 KB. That can cost more than the arithmetic: on the project's test machine
    (a virtual machine, where faults are dearer) `np.tanh` of 1.5 MB took 1.3 ms into fresh
    memory and 0.18 ms into reused memory. With these settings, blocks under `mmap_threshold`
    come from the heap, which is trimmed only when `trim_threshold` bytes at its top are free;
    larger ones (a long KV cache, full-vocabulary logits) are still mapped and unmapped; the
    weights live in memory maps of their own (`weights.fresh_array`). This is process-wide and
    lasts, as mallopt(3) settings do.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not is_int(value) or value >= 2**31:  # mallopt takes a C int
            raise QwenNPError(f"{name} must be a number of bytes, an integer from 0 to 2**31 - 1, got {value!r}")
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library of this process
    except (OSError, AttributeError, TypeError):  # not glibc-like: nothing to do
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))
    mallopt(M_TRIM_THRESHOLD, int(trim_threshold))
