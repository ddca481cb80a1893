"""A model whose weights cannot fit in memory is refused before any weight is read (qwen_np.memory):
the figures read from /proc and the cgroup files, and the error that load() and the command line give.
Without the check the kernel kills the process part way through the load, with no message."""

import json
import math
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import qwen_np
from qwen_np.config import config_from_dict
from qwen_np.memory import gb, memory_room
from qwen_np.weights import expected_shapes, flatten
from conftest import require_reference

MEMINFO = ("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"
           "SwapTotal:       2000000 kB\nSwapFree:        1500000 kB\nHugePages_Total:       0\n")
SWAP = 1500000 * 1024
COMMIT = "CommitLimit:     9000000 kB\nCommitted_AS:    4000000 kB\n"
MACHINE = (8000000 * 1024 + SWAP, "MemAvailable + SwapFree in /proc/meminfo")
V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n"
V1 = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"  # as on the project's test machine
      "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
      "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
      "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
V2_FILES = {"memory.current": "1000000000\n", "memory.stat": "anon 700000000\nfile 300000000\nshmem 100000000\n"}
V1_FILES = {"memory.usage_in_bytes": "1000000000\n",
            "memory.stat": "cache 5\nshmem 0\ntotal_cache 500000000\ntotal_shmem 100000000\n"}


def cgroup_dir(base, files, limit_name, limit):  # -> {path: text} of one cgroup directory
    return {f"{base}/{name}": text for name, text in {**files, limit_name: limit}.items()}


CASES = {  # name -> ({path under the root: text}, (bytes, where) or None)
    "no /proc": ({}, None),
    "no MemAvailable": ({"proc/meminfo": "MemTotal: 16000000 kB\nMemFree: 1000000 kB\n"}, None),
    "the machine only": ({"proc/meminfo": MEMINFO}, MACHINE),
    "strict overcommit": ({"proc/meminfo": MEMINFO + COMMIT, "proc/sys/vm/overcommit_memory": "2\n"},
                          (5000000 * 1024,
                           "CommitLimit - Committed_AS in /proc/meminfo, as vm.overcommit_memory is 2")),
    "heuristic overcommit": ({"proc/meminfo": MEMINFO + COMMIT, "proc/sys/vm/overcommit_memory": "0\n"}, MACHINE),
    "v2, no limit": ({"proc/meminfo": MEMINFO, "proc/self/mountinfo": V2, "proc/self/cgroup": "0::/user.slice\n",
                      **cgroup_dir("sys/fs/cgroup/user.slice", V2_FILES, "memory.max", "max\n")}, MACHINE),
    "v2, the process's own cgroup": (
        {"proc/meminfo": MEMINFO, "proc/self/mountinfo": V2, "proc/self/cgroup": "0::/user.slice/app.scope\n",
         **cgroup_dir("sys/fs/cgroup/user.slice/app.scope", V2_FILES, "memory.max", "3000000000\n"),
         **cgroup_dir("sys/fs/cgroup/user.slice", V2_FILES, "memory.max", "max\n")},
        (3000000000 - 1000000000 + 300000000 - 100000000 + SWAP,
         "the limit in {root}/sys/fs/cgroup/user.slice/app.scope/memory.max, less what its processes use, "
         "plus free swap")),
    "v2, a tighter cgroup above it": (
        {"proc/meminfo": MEMINFO, "proc/self/mountinfo": V2, "proc/self/cgroup": "0::/user.slice/app.scope\n",
         **cgroup_dir("sys/fs/cgroup/user.slice/app.scope", V2_FILES, "memory.max", "3000000000\n"),
         **cgroup_dir("sys/fs/cgroup/user.slice", V2_FILES, "memory.max", "1100000000\n")},
        (1100000000 - 1000000000 + 300000000 - 100000000 + SWAP,
         "the limit in {root}/sys/fs/cgroup/user.slice/memory.max, less what its processes use, plus free swap")),
    "v2, a container's own subtree mounted": (  # /proc/self/cgroup names the host's path
        {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/docker/abc\n",
         "proc/self/mountinfo": V2.replace(" / /sys/fs/cgroup ", " /docker/abc /sys/fs/cgroup "),
         **cgroup_dir("sys/fs/cgroup", V2_FILES, "memory.max", "2000000000\n")},
        (2000000000 - 1000000000 + 300000000 - 100000000 + SWAP,
         "the limit in {root}/sys/fs/cgroup/memory.max, less what its processes use, plus free swap")),
    "v2, a limit that is not a number": (
        {"proc/meminfo": MEMINFO, "proc/self/mountinfo": V2, "proc/self/cgroup": "0::/a\n",
         **cgroup_dir("sys/fs/cgroup/a", V2_FILES, "memory.max", "lots\n")}, MACHINE),
    "v1, a limit on the parent": (
        {"proc/meminfo": MEMINFO.replace("1500000 kB", "0 kB"), "proc/self/mountinfo": V1,
         "proc/self/cgroup": "4:memory:/process_api/x\n1:cpu:/\n0::/\n",
         **cgroup_dir("sys/fs/cgroup/memory/process_api/x", V1_FILES, "memory.limit_in_bytes",
                      "9223372036854771712\n"),
         **cgroup_dir("sys/fs/cgroup/memory/process_api", V1_FILES, "memory.limit_in_bytes", "4000000000\n")},
        (4000000000 - 1000000000 + 500000000 - 100000000,
         "the limit in {root}/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes, less what its processes use")),
}


@pytest.mark.parametrize("case", CASES)
def test_the_room_is_the_tightest_limit_that_applies(tmp_path, case):
    files, expected = CASES[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if expected is not None:
        expected = (expected[0], expected[1].format(root=tmp_path))
    assert memory_room(tmp_path) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo is Linux's")
def test_this_machine_has_a_figure():
    room, where = memory_room()
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    most = sum(int(meminfo[key].split()[0]) for key in ("MemTotal", "SwapTotal")) * 1024
    assert 0 < room <= most, (room, where)


CONFIG = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
          "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def write_checkpoint(path, kind):  # -> the path to load: a safetensors directory (of `kind`'s dtype) or a GGUF file
    shapes = expected_shapes(config_from_dict(CONFIG))
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    if kind == "gguf":
        from gguf_files import write_gguf  # needs the gguf package
        return write_gguf(path / "model.gguf", "qwen3_moe", CONFIG, tensors)
    save_file({name: x.astype(kind) for name, x in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def held(params):  # -> bytes of the arrays of a params tree, each buffer once (experts are views of one array)
    roots = {}
    for x in flatten(params).values():
        while isinstance(x.base, np.ndarray):
            x = x.base
        roots[id(x)] = x
    return sum(x.nbytes for x in roots.values())


@pytest.mark.parametrize("kind", ["float16", "float32", "gguf"])
def test_weights_that_cannot_fit_are_refused_before_any_is_read(tmp_path, monkeypatch, kind):
    path = write_checkpoint(tmp_path, kind)
    shapes = expected_shapes(config_from_dict(CONFIG)).values()
    needed = 4 * sum(map(math.prod, shapes))  # float32
    low = sum(math.prod(shape) * (2 if len(shape) >= 2 else 4) for shape in shapes)  # bf16 matrices

    def room(size):
        monkeypatch.setattr("qwen_np.memory.memory_room", lambda: (size, "a test's figure"))

    # Refused: nothing is read.
    with monkeypatch.context() as m:
        def no_reading(*args, **kwargs):
            raise AssertionError("a tensor was read")
        m.setattr("qwen_np.weights.read_tensor", no_reading)
        m.setattr("qwen_np.gguf.dequantize_tensor", no_reading)
        room(needed - 1)
        with pytest.raises(qwen_np.QwenNPError) as e:
            qwen_np.load(path)
        assert str(e.value) == (f"{path}: its weights need {gb(needed)} of memory in float32, more than the "
                                f"{gb(needed - 1)} free (a test's figure); load it with low_memory=True (--low-memory "
                                f"on the command line), which keeps its matrices in bfloat16: {gb(low)}")
        room(low - 1)
        with pytest.raises(qwen_np.QwenNPError, match=f"; even with low_memory=True they need {gb(low)}: choose a "
                                                      f"smaller model$"):
            qwen_np.load(path)
        with pytest.raises(qwen_np.QwenNPError, match=f"its weights need {gb(low)} of memory with its matrices in "
                                                      r"bfloat16 \(low_memory\), more .*; choose a smaller model"):
            qwen_np.load(path, low_memory=True)

    # Loaded where they just fit; the figures are what the weights then take.
    room(needed)
    assert held(qwen_np.load(path).params) == needed
    room(low)
    assert held(qwen_np.load(path, low_memory=True).params) == low
    if kind != "gguf":  # mapped, float32 weights take no memory of the process's own; others are widened into it
        room(0)
        if kind == "float32":
            qwen_np.load(path, mmap=True)
        else:
            with pytest.raises(qwen_np.QwenNPError, match=f"need {gb(needed)} of memory in float32"):
                qwen_np.load(path, mmap=True)


def test_the_command_line_gives_it_in_one_line(tmp_path, monkeypatch, capsys):
    from qwen_np.__main__ import main

    path = write_checkpoint(tmp_path, "float16")
    monkeypatch.setattr("qwen_np.memory.memory_room", lambda: (1000, "a test's figure"))
    assert main(["generate", "--model", str(path), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: its weights need ")
    assert "more than the 0.0 MB free (a test's figure); even with low_memory=True they need" in err


@pytest.mark.parametrize("family, options", [
    ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {}), ("llama", {"mlp_bias": True}),
    ("qwen2_moe", {}), ("qwen2_moe", {"stacked_experts": True}), ("qwen3_moe", {"stacked_experts": True})])
def test_the_count_is_what_each_family_then_takes(tmp_path, monkeypatch, family, options):
    # The figures check_fits is given, against the memory the loaded weights hold: float32, and bf16
    # matrices, for biases, tied and untied heads, shared experts (with a [1, D] gate) and stacked experts.
    from tiny import tiny_model

    torch, _ = require_reference()
    tiny_model(family, tmp_path, dtype=torch.bfloat16, **options)
    given = []
    monkeypatch.setattr("qwen_np.weights.check_fits", lambda *args: given.append(args))
    default, low = (held(qwen_np.load(tmp_path, low_memory=low_memory).params) for low_memory in (False, True))
    assert given == [(tmp_path, default, low, False), (tmp_path, low, low, True)]
