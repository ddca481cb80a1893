"""The benchmark runs (`python -m qwen_np.bench --smoke`), so it cannot rot. Nothing is timed here:
the figures of a smoke run mean nothing, only their presence and shape are checked."""

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_reference
from tiny import reference_logits, tiny_model

import qwen_np
from qwen_np import bench
from qwen_np.bench import (SMOKE_SHAPES, SMOKE_SIZES, checkpoint_dirs, figures, main, write_checkpoint,
                           write_safetensors)
from qwen_np.weights import float32_to_bf16, read_safetensors_header

FIGURES = {"load_s", "first_forward_s", "prefill_16_s", "prefill_32_s", "decode_short_tok_s", "decode_long_tok_s",
           "peak_rss_load_gb", "peak_rss_prefill_gb", "peak_rss_long_gb"}


@pytest.mark.parametrize("dtype, variants", [
    ("bfloat16", ["qwen_np-low-memory", "qwen_np-no-huge-pages"]),  # the default checkpoints
    ("float32", ["qwen_np-mmap"]),  # mmap=True maps float32 weights only
])
def test_smoke_run_prints_table_and_json(dtype, variants):
    require_reference()  # the reference worker imports torch and transformers
    options = [v.replace("qwen_np", "-") for v in variants]  # "qwen_np-mmap" -> "--mmap"
    done = subprocess.run([sys.executable, "-m", "qwen_np.bench", "--smoke", "--checkpoint-dtype", dtype, *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    *table, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["bench"] == "qwen_np" and result["rounds"] == 1 and result["threads"] == 2
    assert result["checkpoint_dtype"] == dtype
    assert result["ceilings"]["bandwidth_gb_s"] > 0 and result["ceilings"]["matmul_gflop_s"] > 0
    # what the figures came from: this machine, and the versions the workers ran
    assert result["machine"]["cores"] == os.cpu_count() and result["machine"]["python"] == platform.python_version()
    assert result["machine"]["cpu"] and result["machine"]["memory_gib"] > 0
    software = result["software"]
    assert software["numpy"] == np.__version__ and software["blas"] == bench.numpy_blas()
    assert software["transformers"] == metadata.version("transformers")
    assert software["torch"].split("+")[0] == metadata.version("torch").split("+")[0]
    assert software["torch_blas"] and software["cpu_capability"]
    assert set(result["models"]) == set(SMOKE_SHAPES)
    assert SMOKE_SIZES["prefill"] == [16, 32]
    for name, model in result["models"].items():
        assert set(model) == {"qwen_np", "transformers", *variants, "ratio", *[f"ratio_{v}" for v in variants],
                              "of_ceiling", "long_over_short", "weights_gb", "kv_cache_gb"}, name
        for engine in ["qwen_np", "transformers", *variants, "ratio"]:
            assert set(model[engine]) == FIGURES, engine
        assert set(model["of_ceiling"]) == {"prefill_16_s", "prefill_32_s", "decode_short_tok_s", "decode_long_tok_s"}
        assert all(v > 0 for v in [*model["ratio"].values(), *model["of_ceiling"].values(), model["long_over_short"]])
    text = "\n".join(table)
    assert f"NumPy {np.__version__} ({software['blas']}); torch {software['torch']}" in text
    assert "--smoke: tiny sizes that fit in the CPU's caches" in text  # its figures are not the machine's
    for label in [label for _, label, _ in figures(SMOKE_SIZES)] + list(SMOKE_SHAPES):
        assert label in text


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "'0' is not a positive integer"),
    (["--threads", "two"], "'two' is not a positive integer"),
    (["--model", "no-such-dir"], "--model no-such-dir: neither a checkpoint directory with a config.json nor a .gguf"),
    (["--shapes", "qwen9"], "--shapes: unknown qwen9"),
    (["--mmap"], "--mmap maps float32 weights only, and the random checkpoints would be bfloat16"),
])
def test_bad_arguments_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)  # refused before any checkpoint is written or timed
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_takes_directories_and_hub_ids_in_the_cache(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    snapshot = tmp_path / "hub" / "models--Qwen--Tiny" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert checkpoint_dirs([Path("mine"), Path("Qwen/Tiny")]) == {"mine": Path("mine"), "Qwen/Tiny": snapshot}


GGUF_CONFIGS = {  # a small random model of each family qwen_np reads from GGUF files
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16},  # 16, not 32 / 4: transformers' reader would take 8
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 16},
}


def test_model_takes_a_gguf_file(capsys, tmp_path):
    from gguf_files import random_gguf, small_config  # needs the gguf package

    path = random_gguf(tmp_path / "qwen3.gguf", "qwen3", small_config("qwen3", **GGUF_CONFIGS["qwen3"]))
    assert checkpoint_dirs([path]) == {"qwen3.gguf": path}
    with pytest.raises(SystemExit) as e:
        main(["--model", str(path), "--mmap"])
    assert e.value.code == 2
    assert "--model qwen3.gguf is a GGUF file, which qwen_np always dequantizes" in capsys.readouterr().err


@pytest.mark.parametrize("family", GGUF_CONFIGS)
def test_the_reference_worker_builds_the_model_qwen_np_reads_from_a_gguf_file(tmp_path, family, reference):
    # transformers reads the tensors of the file, with the config qwen_np reads from its metadata:
    # the same model, so the same logits (its own GGUF config reader gets qwen3's head size and
    # the MoE families' expert sizes wrong).
    torch, transformers = reference
    from gguf_files import random_gguf, small_config

    path = random_gguf(tmp_path / "m.gguf", family, small_config(family, **GGUF_CONFIGS[family]))
    ours = qwen_np.load(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", config=bench.reference_config(bench.model_config(path)), dtype=torch.float32,
        attn_implementation="eager")
    assert type(theirs).__name__ == bench.CAUSAL_LM[family]
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, (2, 9))
    np.testing.assert_allclose(qwen_np.forward(ours.params, ours.config, ids)[0], reference_logits(theirs, ids),
                               atol=1e-4, rtol=1e-4)


def test_smoke_run_of_a_gguf_file(tmp_path):
    require_reference()  # the reference worker imports torch and transformers, which reads the file with gguf
    from gguf_files import random_gguf, small_config

    path = random_gguf(tmp_path / "tiny.gguf", "qwen3", small_config("qwen3", **GGUF_CONFIGS["qwen3"]))
    done = subprocess.run([sys.executable, "-m", "qwen_np.bench", "--smoke", "--model", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    model = json.loads(done.stdout.strip().splitlines()[-1])["models"]["tiny.gguf"]
    for engine in ["qwen_np", "transformers", "ratio"]:
        assert set(model[engine]) == FIGURES and all(v > 0 for v in model[engine].values()), engine
    # the costs come from the config in the file's metadata
    assert model["weights_gb"] == pytest.approx(bench.costs(qwen_np.load(path).config)["weight_bytes"] / 1e9)


def test_a_checkpoints_directory_that_cannot_be_written_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        main(["--smoke", "--checkpoints", str(tmp_path / "file")])
    assert e.value.code == 2
    assert f"cannot write the random checkpoint {tmp_path / 'file' / 'tiny-qwen2-bfloat16'}: Not a directory" in (
        capsys.readouterr().err)


def test_an_interrupted_checkpoint_write_leaves_no_file_to_reuse(tmp_path):
    class FullDisk:  # a tensor whose bytes stop coming halfway, as on a full disk
        shape, nbytes = (4,), 16

        def tofile(self, f):
            f.write(bytes(8))
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_safetensors(tmp_path / "model.safetensors", {"w": FullDisk()}, "F32")
    assert list(tmp_path.iterdir()) == []  # neither a short model.safetensors nor its .partial


def test_a_bad_checkpoint_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path)])
    assert e.value.code == 2 and "config.json is not valid JSON" in capsys.readouterr().err


def test_mmap_of_a_checkpoint_with_no_float32_weights_is_a_usage_error(capsys, tmp_path):
    write_checkpoint(tmp_path / "bf16", SMOKE_SHAPES["tiny-qwen3"], dtype="bfloat16")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "bf16"), "--mmap"])  # refused before anything is timed
    assert e.value.code == 2
    assert "--mmap maps float32 weights only, and --model bf16 stores BF16" in capsys.readouterr().err


def test_random_checkpoints_are_bf16_as_qwen_publishes_or_float32(tmp_path):
    write_checkpoint(tmp_path / "bf16", SMOKE_SHAPES["tiny-qwen3"], dtype="bfloat16")
    write_checkpoint(tmp_path / "f32", SMOKE_SHAPES["tiny-qwen3"], dtype="float32")
    for name, dtype, stored in [("bf16", "bfloat16", "BF16"), ("f32", "float32", "F32")]:
        assert json.loads((tmp_path / name / "config.json").read_text())["torch_dtype"] == dtype
        header = read_safetensors_header(tmp_path / name / "model.safetensors")
        assert {info[0] for info in header.values()} == {stored}
    wide, narrow = qwen_np.load(tmp_path / "f32").params, qwen_np.load(tmp_path / "bf16").params
    a, b = (p["model"]["layers"][1]["mlp"]["down_proj"]["weight"] for p in (wide, narrow))
    assert b.dtype == np.float32 and np.array_equal(b.view(np.uint32) >> 16, float32_to_bf16(a))


def test_the_no_huge_pages_worker_runs_with_numpys_huge_pages_off(monkeypatch):
    seen = {}

    def run(command, env, **kwargs):
        seen[command[command.index("--worker") + 1]] = env.get("NUMPY_MADVISE_HUGEPAGE")
        return subprocess.CompletedProcess(command, 0, stdout="{}\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    for engine in ["qwen_np", "qwen_np-no-huge-pages", "transformers"]:
        bench.run_worker([engine, "dir"], threads=2)
    assert seen == {"qwen_np": None, "qwen_np-no-huge-pages": "0", "transformers": None}


AMD_GUEST = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
             "flags\t\t: fpu avx2\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC\n\n")


@pytest.mark.parametrize("cpuinfo, name", [
    (AMD_GUEST, "AMD EPYC (family 25, model 1)"),  # the first processor's; "model" is not "model name"
    ("processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor\n",
     "Intel(R) Xeon(R) Processor (family 6, model 143)"),
    ("processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nCPU architecture: 7\n",
     "ARMv7 Processor rev 4 (v7l)"),  # no x86 family: the name alone
    ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n", None),  # no name
])
def test_the_machine_line_names_the_cpu_with_its_family_and_model(cpuinfo, name):
    # Cloud guests of CPUs generations apart can share a model name ("AMD EPYC"), and their figures differ.
    assert bench.cpu_name(cpuinfo) == name


def test_a_worker_that_fails_stops_the_run_with_its_error(monkeypatch):
    # Without the check: a bare IndexError or JSONDecodeError from reading its empty output.
    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="Traceback (most recent call last):\n"
                                                                         "MemoryError: Unable to allocate 2 GiB\n")

    monkeypatch.setattr(bench.subprocess, "run", run)
    with pytest.raises(SystemExit, match="worker qwen_np dir failed \\(exit status 1\\):\nTraceback .*\nMemoryError: "
                                         "Unable to allocate"):
        bench.run_worker(["qwen_np", "dir"], threads=2)


def test_a_worker_killed_for_memory_is_named_so(monkeypatch):
    def run(command, **kwargs):  # what the out-of-memory killer leaves: no output, SIGKILL
        return subprocess.CompletedProcess(command, -9, stdout="", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    with pytest.raises(SystemExit, match=r"^worker transformers dir failed \(killed by SIGKILL, as Linux ends a "
                                         r"process when memory runs out\):\n$"):
        bench.run_worker(["transformers", "dir"], threads=2)


def test_a_worker_refused_by_qwen_np_says_why_in_one_line(tmp_path, monkeypatch):
    # As a worker process runs it (main with --worker): a checkpoint too large for the memory left.
    write_checkpoint(tmp_path, SMOKE_SHAPES["tiny-qwen3"], dtype="bfloat16")
    monkeypatch.setattr("qwen_np.memory.memory_room", lambda: (1000, "a test's figure"))
    with pytest.raises(SystemExit) as e:
        main(["--threads", "1", "--worker", "qwen_np", str(tmp_path), "--sizes", json.dumps(bench.SMOKE_SIZES)])
    assert str(e.value).startswith(f"error: {tmp_path}: its weights need ") and "\n" not in str(e.value)


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("qwen3", {}), ("qwen2_moe", {}), ("qwen3_moe", {}),
                                               ("qwen2", {"tie_word_embeddings": True})])
def test_costs_count_what_the_reference_holds_and_multiplies(reference, tmp_path, family, overrides):
    # The fractions of the ceilings rest on bench.costs: checked against transformers' model, its
    # parameters, the FLOPs of the products it runs (torch's counter) and the keys and values it caches.
    torch, transformers = reference
    from torch.utils.flop_counter import FlopCounterMode
    tiny_model(family, tmp_path, **overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                              experts_implementation="eager")  # countable products
    config = qwen_np.load(tmp_path).config
    costs = bench.costs(config)
    assert costs["weight_bytes"] == 4 * sum(p.numel() for p in model.parameters())  # a tied matrix counted once
    # Norm weights and biases are read by no product, and torch multiplies all T x T query-key pairs
    # (the mask comes after) where the costs count the causal T (T + 1) / 2.
    vectors = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 1 and ".layers." in name)
    pair = config.num_hidden_layers * config.num_attention_heads * config.head_dim  # FLOPs / 2 of a pair's product
    for T in (7, 1):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(torch.arange(T)[None], logits_to_keep=1)
        products = counter.get_total_flops() + 2 * T * vectors - 4 * T * T * pair + 2 * T * (T + 1) * pair
        assert costs["prefill_flops"](T) == pytest.approx(products, rel=1e-12)
        cached = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                     for t in (layer.keys, layer.values))
        assert costs["kv_bytes_per_position"] * T == cached
    # A decoded token's products (T = 1, without attention's) read each of their weights once, the
    # active experts' only: 4 bytes for every 2 FLOPs.
    assert costs["decode_bytes"] == pytest.approx(2 * (products - 4 * pair), rel=1e-12)


def test_the_summary_pairs_each_round_and_divides_by_the_ceilings():
    # Three rounds in which the median of the per-round ratios (what the table reports) differs from
    # the ratio of the medians: round 2 is slow for both engines alike.
    from qwen_np.config import config_from_dict
    config = config_from_dict(SMOKE_SHAPES["tiny-moe"])
    sizes = SMOKE_SIZES

    def result(seconds, tok_s, gb):
        return dict(load_s=seconds, first_s=seconds, prefill_s={str(n): seconds for n in sizes["prefill"]},
                    decode_tok_s={"short": tok_s, "long": tok_s / 2},
                    peak_rss=dict.fromkeys(("load", "prefill", "long"), gb * 1e9))
    runs = [dict(qwen_np=result(1.0, 10.0, 2.0), transformers=result(2.0, 5.0, 4.0)),
            dict(qwen_np=result(9.0, 1.0, 2.0), transformers=result(10.0, 0.8, 4.0)),
            dict(qwen_np=result(1.5, 8.0, 2.0), transformers=result(2.0, 8.0, 3.0))]
    ceilings = [dict(bandwidth=30e9, flops=1e11), dict(bandwidth=20e9, flops=3e11), dict(bandwidth=25e9, flops=2e11)]
    summary = bench.summarise(config, runs, ceilings, sizes, ("qwen_np", "transformers"))
    assert summary["qwen_np"]["load_s"] == 1.5 and summary["transformers"]["load_s"] == 2.0
    assert summary["ratio"]["load_s"] == pytest.approx(0.75)  # of 0.5, 0.9 and 0.75; not 1.5 / 2.0
    assert summary["ratio"]["decode_short_tok_s"] == pytest.approx(1.25)  # of 2, 1.25 and 1: faster is above 1
    assert summary["ratio"]["peak_rss_load_gb"] == pytest.approx(0.5)
    assert summary["long_over_short"] == pytest.approx(0.5)
    costs = bench.costs(config)
    assert summary["of_ceiling"]["decode_short_tok_s"] == pytest.approx(8.0 * costs["decode_bytes"] / 25e9)
    # after the long context, the cache read too: half the new tokens on average
    long_bytes = costs["decode_bytes"] + costs["kv_bytes_per_position"] * (sizes["long_context"]
                                                                          + sizes["new_tokens"] / 2)
    assert summary["of_ceiling"]["decode_long_tok_s"] == pytest.approx(4.0 * long_bytes / 25e9)
    n = sizes["prefill"][0]
    assert summary["of_ceiling"][f"prefill_{n}_s"] == pytest.approx(costs["prefill_flops"](n) / 1.5 / 2e11)
