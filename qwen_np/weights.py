"""All file I/O for Hugging Face checkpoints: safetensors (single or sharded), bf16/fp16/fp32,
tied embeddings, and a shape check of every tensor against the config.

A safetensors file is: 8 bytes (little-endian u64) giving the header size, a JSON header
mapping each tensor name to its dtype, shape and byte range, then the raw bytes. We read it
directly so that bf16 (which NumPy lacks) can be widened exactly and a truncated file is
reported by name.
"""

import math
import mmap as mmap_module
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from mmap import ACCESS_COPY, ACCESS_READ, mmap as memory_map
from pathlib import Path

import numpy as np

from .config import QwenNPError, is_int, is_present, parse_json, read_json
from .memory import check_fits
from .ops import bf16_to_float32, column_major

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: raw bits, widened below


def read_safetensors_header(path):
    """{tensor name: (dtype, shape, absolute byte offset, byte length)} of one .safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QwenNPError(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise QwenNPError(f"{path} is truncated or not a safetensors file: its header claims "
                              f"{header_len} bytes but the file has {size}")
        try:
            header = parse_json(f.read(header_len))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            raise QwenNPError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise QwenNPError(f"{path} has a corrupt safetensors header: it must be a JSON object, "
                          f"found {type(header).__name__}")
    start = 8 + header_len  # where the data section begins; data_offsets count from there
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = header_entry_problem(info)
        if problem:
            raise QwenNPError(f"{path} has a corrupt safetensors header: tensor {name!r} {problem}")
        begin, end = info["data_offsets"]
        if start + end > size:
            raise QwenNPError(f"{path} is truncated: tensor {name!r} needs bytes up to "
                              f"{start + end} but the file has {size}")
        tensors[name] = (info["dtype"], tuple(info["shape"]), start + begin, end - begin)
    # As the safetensors library requires: in order, the tensors' bytes tile the data section,
    # with no overlap (two weights reading the same bytes), no gap and nothing after the last.
    end, before = 0, None  # where the tensors so far end, and the last of them
    for name, (_, _, offset, nbytes) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        begin = offset - start
        if begin != end:
            problem = f"overlap tensor {before!r}, which ends at {end}" if begin < end else \
                f"leave a gap of {begin - end} bytes after {'tensor ' + repr(before) if before else 'the header'}"
            raise QwenNPError(f"{path} has a corrupt safetensors header: the bytes of tensor {name!r} "
                              f"(data_offsets {[begin, begin + nbytes]}) {problem}")
        end, before = begin + nbytes, name
    if start + end != size:
        raise QwenNPError(f"{path} has a corrupt safetensors header: its tensors end at byte {start + end} "
                          f"but the file has {size}")
    return tensors


HEADER_ENTRY = {  # what each key of a tensor's safetensors header entry must hold -> (description, test)
    "dtype": ("a string", lambda v: isinstance(v, str)),
    "shape": ("a list of integers >= 0", lambda v: isinstance(v, list) and all(map(is_int, v))),
    "data_offsets": ("[begin, end] with 0 <= begin <= end",
                     lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_int, v)) and v[0] <= v[1]),
}


def header_entry_problem(info):  # -> what is wrong with one tensor's header entry, or None
    if not isinstance(info, dict):
        return f"is described by {info!r}, not an object"
    for key, (kind, test) in HEADER_ENTRY.items():
        if key not in info:
            return f"has no {key!r}"
        if not test(info[key]):
            return f"has {key} {info[key]!r}; it must be {kind}"
    return None


MAP_PRIVATE = getattr(mmap_module, "MAP_PRIVATE", None)  # Unix only
CHUNK = 1 << 22  # values converted at a time when widening or narrowing (8 MB of a bf16/fp16 file, 16 MB of fp32)
COLUMN_MAJOR_ROWS = 256  # rows filled at a time in a column-major matrix (see row_blocks)


def read_tensor(path, name, dtype, shape, offset, nbytes, mapped=None, bf16=False, by_columns=False):
    """One tensor read straight into its float32 array of `shape`; bf16/fp16 widened a block of rows
    at a time, so the narrow copy never exists in full next to the wide one. With `mapped` (the
    file's copy-on-write memory map), a float32 tensor is a view of the map instead: no copy at
    all. With `bf16`, the result is bfloat16 bits (uint16): a BF16 tensor as stored, F32/F16
    rounded to bfloat16. With `by_columns`, a float32 matrix is laid out column by column (see
    weight_array)."""
    if dtype not in DTYPES:
        raise QwenNPError(f"{path}: tensor {name!r} has dtype {dtype}; qwen_np reads F32, F16 and BF16")
    count = math.prod(shape)  # exact (np.prod would wrap around for absurd shapes)
    if count * np.dtype(DTYPES[dtype]).itemsize != nbytes:
        raise QwenNPError(f"{path}: tensor {name!r} has {nbytes} bytes, not {count} {dtype} values")
    if dtype == "F32" and mapped is not None and not bf16:
        return np.frombuffer(mapped, np.float32, count, offset).reshape(shape)
    out = weight_array(shape, np.uint16 if bf16 else np.float32, by_columns)
    truncated = QwenNPError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
    with open(path, "rb") as f:  # buffered: its readinto fills the whole buffer unless the file ends
        f.seek(offset)
        if dtype == ("BF16" if bf16 else "F32") and out.flags.c_contiguous:  # already in the wanted form
            if f.readinto(out.view(np.uint8)) != nbytes:  # the file shrank since its header was read
                raise truncated
            return out
        rows = as_rows(out)
        for start, stop in row_blocks(rows):
            block = rows[start:stop]
            raw = np.fromfile(f, dtype=DTYPES[dtype], count=block.size)
            if raw.size < block.size:
                raise truncated
            raw = raw.reshape(block.shape)  # the file's rows, in the file's order
            if bf16:  # F32 or F16 -> bfloat16 bits
                block[:] = float32_to_bf16(raw.astype(np.float32, copy=False))
            elif dtype == "BF16":
                bf16_to_float32(raw, out=block)
            else:
                block[:] = raw
    return out


def held_bytes(dtype, shape, mapped, bf16):  # -> bytes of memory read_tensor fills for this tensor (0: a view)
    if dtype == "F32" and mapped and not bf16:
        return 0
    return math.prod(shape) * (2 if bf16 else 4)


def weight_array(shape, dtype, by_columns=False):  # -> fresh array of `shape` for the caller to fill
    # by_columns: a matrix [out, in] laid out column by column (Fortran order), which `linear`
    # streams faster where it has more rows than columns (see ops.column_major). To NumPy it is the
    # same [out, in] array; only the order of its numbers in memory differs.
    flat = fresh_array(math.prod(shape), dtype)
    return flat.reshape(shape[::-1]).T if by_columns else flat.reshape(shape)


def as_rows(array):  # [..., n] -> [rows, n], a view: what a file stores row after row
    if array.ndim == 2:
        return array  # column-major or not
    return array.reshape(math.prod(array.shape[:-1]), array.shape[-1] if array.ndim else 1)  # C order


def row_blocks(rows):  # [rows, n] -> (start, stop) of the blocks of rows to fill at a time
    # CHUNK values at a time; a column-major matrix COLUMN_MAJOR_ROWS rows at a time, as each row
    # written there is spread over every column.
    step = max(1, CHUNK // max(1, rows.shape[1])) if rows.flags.c_contiguous else COLUMN_MAJOR_ROWS
    return [(start, min(start + step, len(rows))) for start in range(0, len(rows), step)]


def fresh_array(count, dtype):  # -> [count] array of `dtype` in fresh memory of its own, for the caller to fill
    # The same as np.empty(count, dtype), but in the system's default pages: NumPy asks Linux for
    # 2 MB "huge" pages for arrays of 4 MB and more (madvise), torch does not. On a virtual machine
    # such as the project's test machine, fresh huge pages are dearer to fault in: loading took
    # 1-3 s longer with them (up to 3-4x as long), for a decoding gain that came and went between
    # series of measurements (0-17% at the median; see the README's Speed and memory).
    # An anonymous memory map (private, as malloc's) is fresh memory that NumPy has not advised.
    if MAP_PRIVATE is None:  # not Unix: NumPy's own memory
        return np.empty(count, dtype)
    return np.frombuffer(memory_map(-1, max(1, count * np.dtype(dtype).itemsize), flags=MAP_PRIVATE), dtype, count)


def float32_to_bf16(x):  # [...] float32 -> [...] uint16 bfloat16 bits
    # Keep the top 16 bits, rounded to nearest, ties to even (as torch's .to(torch.bfloat16)):
    # add 0x7FFF plus the lowest kept bit, then drop the low 16 bits.
    bits = x.view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    # A NaN's low bits could carry into its sign and exponent (0x7FFFFFFF would become -0.0): keep it a NaN.
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def checkpoint_files(directory):
    """{tensor name: file} from model.safetensors.index.json, or from the *.safetensors files."""
    # One model.safetensors is the checkpoint, as for transformers: other files beside it are not read,
    # nor an index (save_pretrained leaves one behind when it saves a sharded checkpoint as one file).
    single = directory / "model.safetensors"
    if single.is_file():
        return tensor_files([single])
    index = directory / "model.safetensors.index.json"
    if is_present(index):
        weight_map = read_weight_map(index)
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise QwenNPError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return {name: directory / f for name, f in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    for f in files:  # a broken link or a pipe (whose read would block) is named now, a directory when it is read
        is_present(f)
    if not files:
        pickled = sorted(f.name for pattern in ("pytorch_model*.bin", "*.pt", "*.pth") for f in directory.glob(pattern))
        found = f"; found only PyTorch pickle weights ({', '.join(pickled)}), which qwen_np does not read" \
            if pickled else ""
        raise QwenNPError(f"no weights in {directory}: expected model.safetensors or "
                          f"model.safetensors.index.json{found}")
    return tensor_files(files)


def read_weight_map(index):  # -> {tensor name: shard file name} of a model.safetensors.index.json
    weight_map = read_json(index).get("weight_map")  # read_json names a file that is not a JSON object
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise QwenNPError(f"{index} is not a valid index (it needs a 'weight_map' object of tensor name -> file name)")
    return weight_map


def tensor_files(files):  # -> {tensor name: file} of .safetensors files that hold no tensor twice
    found = {}
    for f in files:
        for name in read_safetensors_header(f):
            if name in found:
                raise QwenNPError(f"tensor {name!r} is in both {found[name]} and {f}; without "
                                  "model.safetensors.index.json qwen_np cannot tell which one to use")
            found[name] = f
    return found


def expected_shapes(config):
    """{tensor name: shape} of every tensor the config calls for. Biases are listed only where the
    family has them; lm_head only when the embeddings are not tied."""
    D, V, Dh = config.hidden_size, config.vocab_size, config.head_dim
    H, K = config.num_attention_heads, config.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)

    def mlp(prefix, F):
        shapes.update({f"{prefix}.gate_proj.weight": (F, D), f"{prefix}.up_proj.weight": (F, D),
                       f"{prefix}.down_proj.weight": (D, F)})
        if config.mlp_bias:
            shapes.update({f"{prefix}.gate_proj.bias": (F,), f"{prefix}.up_proj.bias": (F,),
                           f"{prefix}.down_proj.bias": (D,)})

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       f"{p}.self_attn.q_proj.weight": (H * Dh, D), f"{p}.self_attn.k_proj.weight": (K * Dh, D),
                       f"{p}.self_attn.v_proj.weight": (K * Dh, D), f"{p}.self_attn.o_proj.weight": (D, H * Dh)})
        if config.attention_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (H * Dh,), f"{p}.self_attn.k_proj.bias": (K * Dh,),
                           f"{p}.self_attn.v_proj.bias": (K * Dh,)})
            if config.model_type not in ("qwen2", "qwen2_moe"):  # attention_bias covers o_proj too
                shapes[f"{p}.self_attn.o_proj.bias"] = (D,)
        if config.model_type in ("qwen3", "qwen3_moe"):
            shapes.update({f"{p}.self_attn.q_norm.weight": (Dh,), f"{p}.self_attn.k_norm.weight": (Dh,)})
        if config.is_sparse_layer(i):
            shapes[f"{p}.mlp.gate.weight"] = (config.num_experts, D)
            for e in range(config.num_experts):
                mlp(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
            if config.model_type == "qwen2_moe":  # its shared expert, even zero-wide, as transformers builds it
                mlp(f"{p}.mlp.shared_expert", config.shared_expert_intermediate_size)
                shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, D)
        else:
            mlp(f"{p}.mlp", config.intermediate_size)
    return shapes


def nest(flat):
    """{"a.0.b": x} -> {"a": [{"b": x}]}: dotted names to a tree; numbered levels become lists."""
    tree = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(tree)


def flatten(tree, prefix=""):
    """{"a": [{"b": x}]} -> {"a.0.b": x}: a tree's leaves by dotted name, the inverse of `nest`."""
    if isinstance(tree, (dict, list)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def load_params(directory, config, mmap=False, low_memory=False):
    """The params tree of a checkpoint directory, every tensor float32 (with low_memory, the
    matrices bfloat16 bits) and shape-checked.

    mmap: float32 tensors become views of the files mapped into memory, as transformers loads
    them: nothing is read until a forward pass touches it, and the pages are shared with the OS
    file cache. The map is copy-on-write: writing into a weight copies that page for this process
    alone, and the file is never changed. bf16/fp16 tensors are widened into memory either way.
    low_memory: matrices (every 2-D tensor, and stacked experts) are kept as bfloat16 bits
    (uint16), half the memory of float32; `linear` and `embedding` widen them a block at a time as
    they are used. Vectors (norm weights, biases) stay float32.
    """
    directory = Path(directory)
    files = checkpoint_files(directory)
    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
    if not any(name.startswith("model.") for name in files):  # a base model's checkpoint: see with_model_prefix
        files, headers = with_model_prefix(files), {f: with_model_prefix(h) for f, h in headers.items()}
    shapes = with_stacked_experts(tensors_to_read(config, files, headers), files, config)
    # Every name and shape is checked from the headers first, so a bad checkpoint fails before any reading.
    check_shapes(shapes, files, headers, directory)
    check_no_unexpected_layer_tensors(headers, shapes, config)

    def as_bf16(name, low=low_memory):  # low_memory keeps the matrices (2-D, and stacked experts) as bf16 bits
        return low and len(shapes[name]) >= 2

    def needed(low):  # -> bytes of memory the weights take, loaded with low_memory=low
        return sum(held_bytes(headers[files[name]][name][0], shape, mmap, as_bf16(name, low))
                   for name, shape in shapes.items())

    check_fits(directory, needed(low_memory), needed(True), low_memory)
    maps = {f: map_file(f, writable_copy=True) for f in headers} if mmap else {}

    def read(name):  # -> the tensor's array (low_memory: a matrix as bfloat16 bits)
        return read_tensor(files[name], name, *headers[files[name]][name], maps.get(files[name]),
                           bf16=as_bf16(name),
                           by_columns=not low_memory and multiplied_by_columns(name, shapes))

    # Tensors are read by one thread per core (at most 8): filling fresh memory is CPU work (the
    # kernel maps and zeroes each page), and file reads and NumPy's copies release the GIL.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return build_tree(split_stacked_experts(dict(zip(shapes, pool.map(read, shapes))), config))


def multiplied_by_columns(name, shapes):  # -> whether `linear` streams this weight faster laid out by columns
    # The embeddings are looked up row by row; only as the (tied) LM head are they multiplied.
    if name == "model.embed_tokens.weight" and "lm_head.weight" in shapes:
        return False
    return column_major(shapes[name])


def tensors_to_read(config, files, headers):  # -> {tensor name: shape} of the tensors to read
    shapes = expected_shapes(config)
    if config.tie_word_embeddings and "lm_head.weight" in files:
        # transformers ties the head to the embeddings only where the checkpoint does not hold two
        # different matrices: a differing lm_head.weight is read as an untied head, and one without
        # embed_tokens serves as both (see build_tree). An equal copy is left unread.
        embed, head = "model.embed_tokens.weight", "lm_head.weight"
        if embed not in files:
            shapes[head] = shapes.pop(embed)
        elif not same_tensor(files, headers, embed, head):
            shapes[head] = shapes[embed]
    return shapes


def with_stacked_experts(shapes, files, config):  # -> shapes, with stacked experts where the checkpoint has them
    # transformers 5 holds a sparse layer's experts as two stacked tensors, `mlp.experts.gate_up_proj`
    # [E, 2F, D] (each expert's gate rows, then its up rows) and `mlp.experts.down_proj` [E, D, F],
    # and saves them so with save_pretrained(..., save_original_format=False). Where a layer's
    # checkpoint has them, they replace its per-expert names; split_stacked_experts undoes it.
    E, F, D = config.num_experts, config.moe_intermediate_size, config.hidden_size
    stacked = [f"model.layers.{i}.mlp.experts" for i in range(config.num_hidden_layers)
               if config.is_sparse_layer(i) and f"model.layers.{i}.mlp.experts.gate_up_proj" in files]
    if stacked:  # drop those layers' "{prefix}.{expert}.{matrix}.weight" names, add the stacked ones
        dropped = set(stacked)
        shapes = {name: shape for name, shape in shapes.items() if name.rsplit(".", 3)[0] not in dropped}
        for p in stacked:
            shapes.update({f"{p}.gate_up_proj": (E, 2 * F, D), f"{p}.down_proj": (E, D, F)})
    return shapes


def split_stacked_experts(flat, config):  # {name: array} -> the same with each expert's matrices named as its own
    # Every expert's gate, up and down are views of the stacked tensors: nothing is copied.
    F = config.moe_intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.gate_up_proj" in flat:
            gate_up, down = flat.pop(f"{p}.gate_up_proj"), flat.pop(f"{p}.down_proj")  # [E, 2F, D], [E, D, F]
            for e in range(config.num_experts):
                flat.update({f"{p}.{e}.gate_proj.weight": gate_up[e, :F], f"{p}.{e}.up_proj.weight": gate_up[e, F:],
                             f"{p}.{e}.down_proj.weight": down[e]})
    return flat


# The heads of transformers' other tasks, which a checkpoint holds in place of a language model's lm_head.
TASK_HEADS = {"score.weight": "a classification head (...ForSequenceClassification, ...ForTokenClassification)",
              "qa_outputs.weight": "a question-answering head (...ForQuestionAnswering)"}


def check_shapes(shapes, files, headers, directory):
    """Every tensor in `shapes` is in the checkpoint, with that shape."""
    for name, shape in shapes.items():
        if name not in files or name not in headers[files[name]]:
            untied = " with tie_word_embeddings false" if name == "lm_head.weight" else ""
            task = [f"; it holds {what} instead ({head!r}): qwen_np runs language models (...ForCausalLM)"
                    for head, what in TASK_HEADS.items() if name == "lm_head.weight" and head in files]
            raise QwenNPError(f"missing tensor {name!r} in {files.get(name, directory)} (the config{untied} "
                              f"calls for it){''.join(task[:1])}")
        found = headers[files[name]][name][1]
        if found != shape:
            raise QwenNPError(f"{files[name]}: tensor {name!r} has shape {list(found)} but the config "
                              f"implies {list(shape)}")


def with_model_prefix(tensors):  # {name: x} -> {"model." + name: x}, lm_head.* unchanged
    # A checkpoint saved from the base model (Qwen3Model, as Qwen3-Embedding is published) names its
    # tensors "layers.0...", not "model.layers.0...": transformers adds the prefix when it loads
    # such a checkpoint into Qwen3ForCausalLM, and so do we.
    return {name if name.startswith("lm_head.") else f"model.{name}": x for name, x in tensors.items()}


def check_no_unexpected_layer_tensors(headers, shapes, config):
    """Refuses a decoder layer's tensor that the config does not call for: the config does not describe
    these weights (a Qwen3 checkpoint labelled llama would lose its q_norm/k_norm). Other extras, such as
    an lm_head equal to tied embeddings, are left unread; so is rotary_emb.inv_freq, a buffer that some
    older checkpoints saved."""
    for f, header in headers.items():
        for name in header:
            if name.startswith("model.layers.") and name not in shapes and not name.endswith("rotary_emb.inv_freq"):
                raise QwenNPError(f"{f}: tensor {name!r} is in the checkpoint but the config (model_type "
                                  f"{config.model_type!r}, {config.num_hidden_layers} layers) does not call for it")


def same_tensor(files, headers, name_a, name_b):  # -> whether the checkpoint stores the two tensors alike
    entry_a, entry_b = headers[files[name_a]].get(name_a), headers[files[name_b]].get(name_b)
    if entry_a is None or entry_b is None:  # counts as alike: the shape check names what is missing
        return True
    (dtype_a, shape_a, offset_a, size), (dtype_b, shape_b, offset_b, size_b) = entry_a, entry_b
    if (dtype_a, shape_a, size) != (dtype_b, shape_b, size_b):
        return False
    a = np.frombuffer(map_file(files[name_a]), np.uint8, size, offset_a)
    b = np.frombuffer(map_file(files[name_b]), np.uint8, size, offset_b)
    # CHUNK bytes at a time: array_equal builds a boolean array as large as what it compares.
    return all(np.array_equal(a[i:i + CHUNK], b[i:i + CHUNK]) for i in range(0, size, CHUNK))


def map_file(path, writable_copy=False):  # -> the whole file mapped; it stays mapped while a view of it lives
    # Read-only, or with `writable_copy` copy-on-write (MAP_PRIVATE): arrays over it can be written,
    # each written page becoming this process's own copy, and the file is never changed.
    with open(path, "rb") as f:
        try:
            return memory_map(f.fileno(), 0, access=ACCESS_COPY if writable_copy else ACCESS_READ)
        except OSError as e:  # e.g. ENOMEM: a copy-on-write map counts toward a strict commit limit
            raise QwenNPError(f"cannot map {path} into memory: {e.strerror or e}") from None


def build_tree(flat):
    """The params tree of {dotted HF name: array}; without an lm_head the embeddings are tied."""
    params = nest(flat)
    # Tied embeddings: the LM head is the embedding matrix itself (the same array, not a copy); a
    # checkpoint that holds only lm_head.weight gives it to the embeddings instead, as transformers does.
    if "lm_head" not in params:
        params["lm_head"] = {"weight": params["model"]["embed_tokens"]["weight"]}
    elif "embed_tokens" not in params["model"]:
        params["model"] = {"embed_tokens": {"weight": params["lm_head"]["weight"]}, **params["model"]}
    return params


def read_text(path):  # -> the contents of a UTF-8 text file
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QwenNPError(f"{path} is not UTF-8 text: {e}") from None


def load_tokenizer(directory, model_type=None):
    """The `tokenizers.Tokenizer` of tokenizer.json in `directory`, or None when there is none.
    Without tokenizer.json, a Qwen tokenizer is built from vocab.json and merges.txt, as transformers
    builds it (see vocab_merges_tokenizer); model_type is config.json's."""
    path = Path(directory) / "tokenizer.json"
    if not is_present(path):
        return vocab_merges_tokenizer(Path(directory), model_type)
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise QwenNPError(f"{path} could not be read as a tokenizer: {e}") from None


# The pre-tokenizer split of Qwen2 (and Qwen2.5, Qwen3): letters keep one leading non-letter,
# digits split one by one, punctuation runs keep trailing newlines.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # whose tokenizer transformers' Qwen2Tokenizer is


def qwen2_pre_tokenization():  # -> (normalizer, pre-tokenizer) as Qwen's tokenizer.json: NFC, the split, byte symbols
    from tokenizers import Regex, normalizers, pre_tokenizers
    return normalizers.NFC(), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def vocab_merges_tokenizer(directory, model_type):
    """A Qwen tokenizer from vocab.json and merges.txt, where a checkpoint has them but no tokenizer.json,
    as transformers' Qwen2Tokenizer builds it: byte-level BPE, Qwen's split, then the added tokens of
    tokenizer_config.json (added_tokens_decoder) with their ids, and any special token not among them.
    None where the files are absent, or tokenizer_config.json names another tokenizer class."""
    files = [directory / "vocab.json", directory / "merges.txt"]
    if not all(map(is_present, files)):
        return None
    tokenizer_config = read_json(directory / "tokenizer_config.json") or {}
    kind = tokenizer_config.get("tokenizer_class")
    if kind not in ("Qwen2Tokenizer", "Qwen2TokenizerFast") and (kind is not None or model_type not in QWEN_FAMILIES):
        return None
    from tokenizers import Tokenizer, decoders, models
    try:
        bpe = models.BPE.from_file(*map(str, files), fuse_unk=False, byte_fallback=False)
    except Exception as e:  # the tokenizers library raises its own exception type
        raise QwenNPError(f"{directory}: vocab.json and merges.txt could not be read as a BPE tokenizer: "
                          f"{e}") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer, tokenizer.pre_tokenizer = qwen2_pre_tokenization()
    tokenizer.decoder = decoders.ByteLevel()
    add_config_tokens(tokenizer, tokenizer_config, directory / "tokenizer_config.json")
    return tokenizer


def add_config_tokens(tokenizer, tokenizer_config, source):
    """Adds tokenizer_config.json's added tokens (added_tokens_decoder), each at its id, then its special
    tokens that are still missing (eos, pad, ...), in the order transformers adds them."""
    from tokenizers import AddedToken
    added = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict) or not all(
            str(i).isdigit() and isinstance(t, dict) and isinstance(t.get("content"), str) for i, t in added.items()):
        raise QwenNPError(f"{source}: added_tokens_decoder must map token ids to {{\"content\": ...}} objects")
    for i, token in sorted((int(i), t) for i, t in added.items()):
        flags = {key: bool(token.get(key, False)) for key in ("single_word", "lstrip", "rstrip", "special")}
        flags["normalized"] = bool(token.get("normalized", not flags["special"]))
        (tokenizer.add_special_tokens if flags["special"] else tokenizer.add_tokens)(
            [AddedToken(token["content"], **flags)])
        got = tokenizer.token_to_id(token["content"])
        if got != i:
            raise QwenNPError(f"{source}: added token {token['content']!r} has id {i} in added_tokens_decoder, but "
                              f"vocab.json and the tokens before it put it at {got}")
    special = [tokenizer_config.get(key, default) for key, default in (  # with Qwen2Tokenizer's defaults
        ("bos_token", None), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"),
        ("pad_token", "<|endoftext|>"))]
    for key in ("additional_special_tokens", "extra_special_tokens"):  # transformers 4's name, and 5's
        special += tokenizer_config.get(key) if isinstance(tokenizer_config.get(key), list) else []
    for value in special:  # those that added_tokens_decoder did not hold come after it
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str) and tokenizer.token_to_id(content) is None:
            tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
