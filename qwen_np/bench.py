"""Speed and memory of qwen_np against `transformers`, measured in one run on this machine.

    python -m qwen_np.bench                   # random checkpoints of real shapes, 3 rounds
    python -m qwen_np.bench --model DIR       # a checkpoint of your own instead
    python -m qwen_np.bench --model FILE.gguf # or a GGUF file, which both engines dequantize
    python -m qwen_np.bench --smoke           # tiny shapes, one round: checks that the benchmark runs
    python -m qwen_np.bench --bf16            # also time transformers in bfloat16
    python -m qwen_np.bench --mmap --checkpoint-dtype float32   # also time qwen_np.load(..., mmap=True)
    python -m qwen_np.bench --low-memory      # also time qwen_np.load(..., low_memory=True)
    python -m qwen_np.bench --no-huge-pages   # also time qwen_np with NumPy's huge pages off
    python -m qwen_np.bench --checkpoint-dtype float32   # random checkpoints in float32, not bf16

Every measurement runs in a fresh worker process (`--worker ENGINE DIR`), one engine after the
other and in alternating order round by round, so that all see the same noise from a shared
machine. Each worker loads the checkpoint, prefills prompts, decodes greedily with the KV cache
and reports its times and its peak resident memory as one JSON line. The table shows medians
over rounds; the ratios are medians of the per-round ratios (paired). Another worker measures
the machine's ceilings in each round: memory bandwidth (a float32 matrix-vector product over a
matrix far larger than the caches) and float32 matmul GFLOP/s. Decode speed is reported as a
fraction of the bandwidth ceiling (bytes of weights read per token, from the config) and
prefill as a fraction of the matmul ceiling (FLOPs from the config). The output names the machine
and the software, the BLAS libraries included: they decide how fast the products run.

torch and transformers are imported only inside the reference worker: qwen_np never needs them.
"""

import argparse
import dataclasses
import inspect
import json
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import is_gguf_file, model_location
from .config import QwenNPError, read_config, read_json
from .generate import counted
from .weights import checkpoint_files, expected_shapes, float32_to_bf16, read_safetensors_header

# Random checkpoints of real shapes (the released models' config.json, minus the tokenizer ids).
SHAPES = {
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936,
                         hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0),
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0),
    # Not a released model: Qwen3-MoE with 8 experts, 2 active, to show that decoding reads the
    # active experts only (about half of this model's weights per token).
    "moe-8x-top2": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                        hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=128, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=1024, norm_topk_prob=True, max_position_embeddings=40960,
                        rope_theta=1000000.0),
}
COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
SMOKE_SHAPES = {  # the same families, tiny
    "tiny-qwen2": dict(SHAPES["qwen2.5-0.5b"], vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen3": dict(SHAPES["qwen3-0.6b"], vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "tiny-moe": dict(SHAPES["moe-8x-top2"], vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     moe_intermediate_size=32),
}
SIZES = dict(prefill=[128, 1024], short_prompt=16, long_context=2048, new_tokens=64,
             bandwidth_matrix=(8192, 16384), matmul_n=2048)  # the bandwidth matrix is 512 MB
SMOKE_SIZES = dict(prefill=[16, 32], short_prompt=4, long_context=48, new_tokens=4,
                   bandwidth_matrix=(1024, 2048), matmul_n=256)
ENGINES = ("qwen_np", "transformers")
QWEN_NP_VARIANTS = {"qwen_np": {}, "qwen_np-mmap": dict(mmap=True), "qwen_np-low-memory": dict(low_memory=True),
                    "qwen_np-no-huge-pages": {}}
# NumPy's huge pages (see weights.fresh_array, which keeps the weights out of them) turned off for
# everything else too, activations and the KV cache, in the variant's worker process.
WORKER_ENV = {"qwen_np-no-huge-pages": dict(NUMPY_MADVISE_HUGEPAGE="0")}


# ---------------------------------------------------------------------------------------------
# Checkpoints and what the config says a token costs


# A checkpoint's dtype -> (its safetensors dtype, the conversion of a float32 array to it)
STORED = {"float32": ("F32", lambda x: x), "bfloat16": ("BF16", float32_to_bf16)}


def write_checkpoint(directory, raw_config, seed=0, dtype="float32"):
    """config.json and a model.safetensors of random weights with the config's shapes, stored as
    `dtype`: "float32", or "bfloat16" (as Qwen publishes its checkpoints)."""
    stored, convert = STORED[dtype]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**COMMON, **raw_config, "torch_dtype": dtype}, indent=1))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(read_config(directory)).items():
        if name.endswith("norm.weight"):
            x = np.ones(shape, np.float32)
        else:  # small weights, like a trained model's, keep activations in range for any depth
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        tensors[name] = convert(x)
    write_safetensors(directory / "model.safetensors", tensors, stored)


def write_safetensors(path, tensors, dtype):  # {name: array} of one safetensors dtype (BF16: uint16 bits)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, x in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data that follows starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")  # named when whole: a cut-short file is never reused
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for x in tensors.values():
                x.tofile(f)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def costs(config):
    """Per-model figures from the config: float32 weight bytes, bytes read per decoded token,
    KV cache bytes per position, and a function giving the FLOPs of a T-token prefill."""
    sizes = {name: int(np.prod(shape)) for name, shape in expected_shapes(config).items()}
    layers = sum(n for name, n in sizes.items() if name.startswith("model.layers."))
    experts = sum(n for name, n in sizes.items() if ".mlp.experts." in name)
    active = config.num_experts_per_tok / config.num_experts if config.num_experts else 0
    per_token = layers - experts * (1 - active)  # every layer's weights, of the experts the active ones
    lm_head = sizes.get("lm_head.weight", sizes["model.embed_tokens.weight"])  # tied: the embedding matrix
    heads = config.num_hidden_layers * config.num_attention_heads * config.head_dim

    def prefill_flops(T):  # the matrix products: every layer on T tokens, causal attention
        # (T (T + 1) / 2 query-key pairs, each a product with q and one with v), the LM head once.
        return 2 * T * per_token + 2 * T * (T + 1) * heads + 2 * lm_head

    return dict(weight_bytes=4 * sum(sizes.values()), decode_bytes=4 * (per_token + lm_head),
                total_bytes=4 * (layers + lm_head), prefill_flops=prefill_flops,
                kv_bytes_per_position=4 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim)


# ---------------------------------------------------------------------------------------------
# Workers: each prints one JSON line


def peak_rss():  # bytes: the largest resident set this process has had
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: VmHWM. (ru_maxrss would include the parent's peak: it survives fork and exec.)
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return 1024 * int(line.split()[1])
    import resource  # elsewhere (Unix only)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def measure(load, step, new_cache, vocab_size, sizes):
    """Times one engine: `load()` -> model; `step(model, ids [1, T], cache)` -> (logits [1, V], cache);
    `new_cache(model, capacity)` -> the cache to prefill into before decoding."""
    def timed(f, *args):  # -> (f's result, seconds)
        start = time.perf_counter()
        result = f(*args)
        return result, time.perf_counter() - start

    model, load_s = timed(load)
    load_rss = peak_rss()
    rng = np.random.default_rng(0)

    def prompt(n):
        return rng.integers(0, vocab_size, (1, n))

    _, first_s = timed(step, model, prompt(8), None)  # the first forward: thread pools, lazily mapped weights
    prefill_s = {}
    for n in sizes["prefill"]:  # the faster of two runs: the first of a new size also pays for fresh memory
        prefill_s[str(n)] = min(timed(step, model, prompt(n), None)[1] for _ in range(2))
    decode_tok_s, rss = {}, {"load": load_rss, "prefill": peak_rss()}
    for name, n in (("short", sizes["short_prompt"]), ("long", sizes["long_context"])):
        logits, cache = step(model, prompt(n), new_cache(model, n + sizes["new_tokens"]))
        start = time.perf_counter()
        for _ in range(sizes["new_tokens"]):  # greedy: the most likely token is the next input
            logits, cache = step(model, logits.argmax(-1)[:, None], cache)
        decode_tok_s[name] = sizes["new_tokens"] / (time.perf_counter() - start)
    rss["long"] = peak_rss()
    return dict(load_s=load_s, first_s=first_s, prefill_s=prefill_s, decode_tok_s=decode_tok_s, peak_rss=rss)


def qwen_np_worker(directory, sizes, **load_options):  # -> measure()'s figures for qwen_np, and its software
    import qwen_np
    from qwen_np.model import empty_cache

    def step(model, ids, cache):
        logits, cache = qwen_np.forward(model.params, model.config, ids, cache, last_only=True)
        return logits[:, -1], cache

    def new_cache(model, capacity):  # room for prompt and answer: filled in place, never regrown
        return empty_cache(model.config, 1, capacity)

    vocab_size = model_config(directory).vocab_size
    result = measure(lambda: qwen_np.load(directory, **load_options), step, new_cache, vocab_size, sizes)
    return dict(result, software=dict(numpy=np.__version__, blas=numpy_blas()))


def numpy_blas():  # -> e.g. "scipy-openblas 0.3.31": the BLAS that NumPy was built with, which runs its products
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except (TypeError, KeyError):  # a NumPy without show_config(mode=...), or a build that does not say
        return "unknown"


def transformers_worker(directory, sizes, threads, bf16=False):  # -> the same figures for transformers (torch CPU)
    import torch
    import transformers

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    directory = Path(directory)
    config = model_config(directory)
    if is_gguf_file(directory):  # transformers dequantizes a GGUF file with gguf-py, as qwen_np with its own reader
        # and is given the config qwen_np reads from the metadata: its own GGUF reader ignores
        # qwen3's head size and the MoE families' expert sizes, and would build another model.
        reference = reference_config(config)
        where, options = directory.parent, dict(gguf_file=directory.name, config=reference)
        architectures = reference.architectures
    else:
        where, options = directory, {}
        architectures = (read_json(directory / "config.json") or {}).get("architectures") or ["LlamaForCausalLM"]
    # transformers imports its modelling code on first use (2-3 s here): done now, so that the
    # load below times reading the checkpoint, not Python imports (qwen_np is imported already).
    model_class = getattr(transformers, architectures[0], transformers.LlamaForCausalLM)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            where, **options, dtype=dtype, attn_implementation="eager").eval()

    # forward's argument for the cache: transformers 5.24 renamed past_key_values to cache (the old name deprecated)
    argument = "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"

    def step(model, ids, cache):
        with torch.inference_mode():  # logits_to_keep=1: the LM head on the last position, as generate() does
            out = model(input_ids=torch.from_numpy(ids), **{argument: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().numpy(), cache  # the model appended to the cache in place

    def new_cache(model, capacity):  # its default, which the model would create on the first call
        return transformers.DynamicCache(config=model.config)

    result = measure(load, step, new_cache, config.vocab_size, sizes)
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return dict(result, software=dict(torch=torch.__version__, torch_blas=blas[1] if blas else "unknown",
                                      cpu_capability=torch.backends.cpu.get_cpu_capability(),
                                      transformers=transformers.__version__))


def ceilings_worker(sizes):
    """This machine's best float32 memory bandwidth (bytes/s) and matmul rate (FLOP/s), now."""
    def best_time(f, repeats):
        f()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    rows, cols = sizes["bandwidth_matrix"]
    W = np.ones((rows, cols), np.float32)  # ones, not zeros: zero pages would all share one page
    x = np.ones(cols, np.float32)
    bandwidth = W.nbytes / best_time(lambda: W @ x, 20)
    del W
    n = sizes["matmul_n"]
    A = np.ones((n, n), np.float32)
    flops = 2 * n**3 / best_time(lambda: A @ A, 10)
    return dict(bandwidth=bandwidth, flops=flops)


# ---------------------------------------------------------------------------------------------
# The parent: rounds of workers, then the table and the JSON line


def read_through(directory):
    """Reads the checkpoint's files once, so that every engine loads them from the page cache."""
    for path in [directory] if is_gguf_file(directory) else Path(directory).glob("*.safetensors"):
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 26):
                pass


def run_worker(args, threads):  # -> the JSON line of `python -m qwen_np.bench --worker ARGS`, run in a fresh process
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", **WORKER_ENV.get(args[0], {}))
    root = str(Path(__file__).resolve().parent.parent)  # so the worker imports this qwen_np
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "qwen_np.bench", "--threads", str(threads), "--worker", *args],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        how = f"exit status {done.returncode}"
        if done.returncode < 0:  # SIGKILL, with no word from the worker: the out-of-memory killer, most likely
            how = f"killed by {signal.Signals(-done.returncode).name}"
            how += ", as Linux ends a process when memory runs out" if done.returncode == -signal.SIGKILL else ""
        raise SystemExit(f"worker {' '.join(args)} failed ({how}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine():  # what the figures came from: the CPU as the OS names it, its cores, memory and Python
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: platform.processor() says only "x86_64"
        cpu = cpu_name(cpuinfo.read_text()) or cpu
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # Windows, or a system that does not say
        memory_gib = None
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=memory_gib, python=platform.python_version())


def cpu_name(cpuinfo):  # /proc/cpuinfo's text -> e.g. "AMD EPYC (family 25, model 1)", or None
    # A cloud guest's model name can be as vague as "AMD EPYC" for CPUs generations apart; the x86
    # family and model numbers tell them apart.
    fields = {}
    for line in cpuinfo.splitlines():  # "key<tab>: value"; processor 0 comes first, and its values are kept
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not fields.get("model name"):  # e.g. many ARM kernels
        return None
    if not fields.get("cpu family"):
        return fields["model name"]
    return f"{fields['model name']} (family {fields['cpu family']}, model {fields.get('model', '?')})"


def describe(host, software):  # -> one line of the printed header
    memory = f", {host['memory_gib']:.0f} GiB" if host["memory_gib"] else ""
    return (f"Machine: {host['cpu']}, {host['cores']} cores{memory}; Python {host['python']}; "
            f"NumPy {software['numpy']} ({software['blas']}); torch {software['torch']} (BLAS "
            f"{software['torch_blas']}, CPU capability {software['cpu_capability']}); "
            f"transformers {software['transformers']}.")


def median(values):
    return float(np.median(values))


def figures(sizes):
    """(key, table label, how to read it from a worker's result) for every reported figure."""
    short, long = sizes["short_prompt"], sizes["long_context"]
    return ([("load_s", "load (s)", lambda r: r["load_s"]),
             ("first_forward_s", "first forward, 8 tokens (s)", lambda r: r["first_s"])]
            + [(f"prefill_{n}_s", f"prefill {n} tokens (s)", lambda r, n=n: r["prefill_s"][str(n)])
               for n in sizes["prefill"]]
            + [("decode_short_tok_s", f"decode after {short} (tok/s)", lambda r: r["decode_tok_s"]["short"]),
               ("decode_long_tok_s", f"decode after {long} (tok/s)", lambda r: r["decode_tok_s"]["long"]),
               ("peak_rss_load_gb", "peak RSS after load (GB)", lambda r: r["peak_rss"]["load"] / 1e9),
               ("peak_rss_prefill_gb", f"peak RSS to prefill {max(sizes['prefill'])} (GB)",
                lambda r: r["peak_rss"]["prefill"] / 1e9),
               ("peak_rss_long_gb", f"peak RSS with {long} context (GB)", lambda r: r["peak_rss"]["long"] / 1e9)])


def ceiling_fractions(config, sizes, medians, bandwidth, flops):
    """qwen_np's prefill as a fraction of the matmul ceiling, decoding of the bandwidth ceiling
    (after the long context the cache is read too: its bytes are counted)."""
    c = costs(config)
    long_bytes = c["decode_bytes"] + c["kv_bytes_per_position"] * (sizes["long_context"] + sizes["new_tokens"] / 2)
    fractions = {f"prefill_{n}_s": c["prefill_flops"](n) / medians[f"prefill_{n}_s"] / flops for n in sizes["prefill"]}
    fractions["decode_short_tok_s"] = medians["decode_short_tok_s"] * c["decode_bytes"] / bandwidth
    fractions["decode_long_tok_s"] = medians["decode_long_tok_s"] * long_bytes / bandwidth
    return fractions


def summarise(config, runs, ceilings, sizes, engines):
    """One model's figures: medians per engine, paired ratios qwen_np / reference (below 1 is
    better for times and memory, above 1 for tokens/s), qwen_np against the ceilings."""
    bandwidth, flops = median([x["bandwidth"] for x in ceilings]), median([x["flops"] for x in ceilings])
    rows = figures(sizes)
    summary = {e: {key: median([get(r[e]) for r in runs]) for key, _, get in rows} for e in engines}
    for reference in engines[1:]:
        summary["ratio" if reference == "transformers" else f"ratio_{reference}"] = {
            key: median([get(r["qwen_np"]) / get(r[reference]) for r in runs]) for key, _, get in rows}
    summary["of_ceiling"] = ceiling_fractions(config, sizes, summary["qwen_np"], bandwidth, flops)
    summary["long_over_short"] = median([r["qwen_np"]["decode_tok_s"]["long"] / r["qwen_np"]["decode_tok_s"]["short"]
                                         for r in runs])
    c = costs(config)
    summary["weights_gb"] = c["weight_bytes"] / 1e9
    summary["kv_cache_gb"] = c["kv_bytes_per_position"] * (sizes["long_context"] + sizes["new_tokens"]) / 1e9
    return summary


def table(name, config, summary, sizes, engines):
    """The printed table of one model."""
    c = costs(config)
    width = max(18, *(len(e) + 2 for e in engines))
    lines = [f"\n{name}: {c['weight_bytes'] / 4e6:.4g}M parameters, {c['weight_bytes'] / 1e9:.3g} GB float32; decoding "
             f"reads {c['decode_bytes'] / 1e9:.3g} GB of weights per token"
             + (f" (of {c['total_bytes'] / 1e9:.3g} GB: the active experts only)" if config.num_experts else "")
             + f"; KV cache at {sizes['long_context'] + sizes['new_tokens']} positions {summary['kv_cache_gb']:.3g} GB",
             f"{'':30}" + "".join(f"{e:>{width}}" for e in engines) + f"{'qwen_np/transf.':>17}{'of ceiling':>12}"]
    for key, label, _ in figures(sizes):
        fraction = summary["of_ceiling"].get(key)
        lines.append(f"{label:30}" + "".join(f"{summary[e][key]:>{width}.3g}" for e in engines)
                     + f"{summary['ratio'][key]:>16.2f}x" + (f"{fraction:>12.0%}" if fraction is not None else ""))
    return "\n".join(lines)


def positive_int(text):  # an argparse type
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def stored_dtypes(directory):  # -> {"BF16", ...}: the safetensors dtypes of a checkpoint's tensors
    files = set(checkpoint_files(directory).values())
    return {dtype for path in files for dtype, *_ in read_safetensors_header(path).values()}


def checkpoint_dirs(paths):  # --model's [Path] -> {name: checkpoint directory or .gguf file}
    """A Hub id that is not a local path stands for its copy in the Hugging Face cache, as in `load`."""
    models = {}
    for path in paths:
        directory = model_location(path) or path
        if not is_gguf_file(directory) and not (directory / "config.json").is_file():
            raise QwenNPError(f"--model {path}: neither a checkpoint directory with a config.json nor a .gguf file")
        models[path.name if directory == path else str(path)] = directory
    return models


CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}  # model_type -> transformers class


def reference_config(config):  # qwen_np's Config -> transformers' config of the same model (imports transformers)
    import transformers

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields = {name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()}
    return transformers.AutoConfig.for_model(**fields, architectures=[CAUSAL_LM[config.model_type]])


def model_config(path):  # -> the Config of a checkpoint directory or a .gguf file
    if is_gguf_file(path):
        from .gguf import config_from_gguf, read_gguf

        return config_from_gguf(*read_gguf(path), path)
    return read_config(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qwen_np.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=Path,
                        help="a checkpoint directory, a .gguf file, or a Hub id in the Hugging Face cache (repeatable)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds of runs, each engine once a round; the table gives medians over them (default 3)")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads for both engines (default 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    parser.add_argument("--bf16", action="store_true", help="also time transformers in bfloat16")
    parser.add_argument("--mmap", action="store_true", help="also time qwen_np with mmap=True (float32 weights "
                                                            "left in the mapped file; with random checkpoints, "
                                                            "needs --checkpoint-dtype float32)")
    parser.add_argument("--low-memory", action="store_true", help="also time qwen_np with low_memory=True "
                                                                  "(weight matrices in bfloat16)")
    parser.add_argument("--no-huge-pages", action="store_true", help="also time qwen_np with NumPy's huge pages "
                                                                     "off (NUMPY_MADVISE_HUGEPAGE=0) for activations "
                                                                     "and the KV cache; the loader's weights never ask "
                                                                     "for them")
    parser.add_argument("--checkpoint-dtype", choices=list(STORED), default="bfloat16",
                        help="how the random checkpoints store their weights (default bfloat16, as Qwen publishes; "
                             "both engines compute in float32)")
    parser.add_argument("--shapes", nargs="+", help=f"which random shapes (default all: {', '.join(SHAPES)})")
    parser.add_argument("--checkpoints", type=Path, help="write (or reuse) the random checkpoints here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # a child process: measure, print one JSON line, exit
        sizes = json.loads(args.sizes)
        engine, *rest = args.worker
        try:
            if engine == "ceilings":
                result = ceilings_worker(sizes)
            elif engine in QWEN_NP_VARIANTS:
                result = qwen_np_worker(Path(rest[0]), sizes, **QWEN_NP_VARIANTS[engine])
            else:
                result = transformers_worker(Path(rest[0]), sizes, args.threads, bf16=engine == "transformers-bf16")
        except QwenNPError as e:  # one line, for run_worker to pass on (a model too large for memory, say)
            raise SystemExit(f"error: {e}") from None
        print(json.dumps(result))
        return

    sizes = SMOKE_SIZES if args.smoke else SIZES
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rounds = 1 if args.smoke else args.rounds
    try:
        given = checkpoint_dirs(args.model or ())
    except QwenNPError as e:
        parser.error(str(e))
    unknown = set(args.shapes or ()) - set(shapes)
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(sorted(unknown))}; the shapes are {', '.join(shapes)}")
    if args.mmap:  # mmap=True maps float32 tensors only; others are widened into memory as without it
        if not given and args.checkpoint_dtype != "float32":
            parser.error(f"--mmap maps float32 weights only, and the random checkpoints would be "
                         f"{args.checkpoint_dtype}: add --checkpoint-dtype float32")
        for name, path in given.items():
            if is_gguf_file(path):
                parser.error(f"--mmap maps float32 safetensors weights, and --model {name} is a GGUF file, which "
                             f"qwen_np always dequantizes into memory")
            try:
                stored = stored_dtypes(path)
            except QwenNPError as e:
                parser.error(str(e))
            if "F32" not in stored:
                parser.error(f"--mmap maps float32 weights only, and --model {name} stores "
                             f"{', '.join(sorted(stored))}: its mmap row would load like the default one")
    engines = (ENGINES + (("qwen_np-mmap",) if args.mmap else ()) + (("qwen_np-low-memory",) if args.low_memory else ())
               + (("qwen_np-no-huge-pages",) if args.no_huge_pages else ())
               + (("transformers-bf16",) if args.bf16 else ()))
    with tempfile.TemporaryDirectory(prefix="qwen_np_bench_") as tmp:
        if given:
            models = given
        else:
            root = args.checkpoints or Path(tmp)
            models = {name: root / f"{name}-{args.checkpoint_dtype}" for name in (args.shapes or shapes)}
            for name, path in models.items():
                if not (path / "model.safetensors").is_file():
                    print(f"writing a random {name} checkpoint to {path}", file=sys.stderr)
                    try:
                        write_checkpoint(path, shapes[name], dtype=args.checkpoint_dtype)
                    except OSError as e:  # --checkpoints names a file, a read-only place, a full disk...
                        parser.error(f"cannot write the random checkpoint {path}: {e.strerror or e}")
            if hasattr(os, "sync"):
                os.sync()  # let the written gigabytes reach the disk before anything is timed
        try:
            configs = {name: model_config(path) for name, path in models.items()}
        except QwenNPError as e:
            parser.error(str(e))

        ceilings, runs = [], {name: [] for name in models}
        for r in range(rounds):
            ceilings.append(run_worker(["ceilings", "--sizes", json.dumps(sizes)], args.threads))
            order = engines if r % 2 == 0 else engines[::-1]  # alternate who goes first
            for name, path in models.items():
                print(f"round {r + 1}/{rounds}: {name}", file=sys.stderr)
                run = {}
                for e in order:
                    read_through(path)
                    run[e] = run_worker([e, str(path), "--sizes", json.dumps(sizes)], args.threads)
                runs[name].append(run)

    bandwidth, flops = median([x["bandwidth"] for x in ceilings]), median([x["flops"] for x in ceilings])
    first = next(iter(runs.values()))[0]  # every worker of one engine runs the same software
    software = {**first["qwen_np"]["software"], **first["transformers"]["software"]}
    host = machine()
    summaries = {name: summarise(configs[name], runs[name], ceilings, sizes, engines) for name in models}
    print(f"qwen_np against transformers (torch CPU, float32, eager attention), {counted(args.threads, 'thread')}, "
          f"{counted(rounds, 'round')}: medians, and ratios as medians of each round's ratio. This machine's ceilings: "
          f"{bandwidth / 1e9:.1f} GB/s memory bandwidth, {flops / 1e9:.0f} GFLOP/s float32 matmul."
          + ("" if given else f" The random checkpoints store {args.checkpoint_dtype} weights.")
          + (" (--smoke: tiny sizes that fit in the CPU's caches, so the figures say only that the benchmark "
             "runs, not how fast this machine is.)" if args.smoke else ""))
    print(describe(host, software))
    for name in models:
        print(table(name, configs[name], summaries[name], sizes, engines))
    print(json.dumps({"bench": "qwen_np", "rounds": rounds, "threads": args.threads, "sizes": sizes,
                      "checkpoint_dtype": None if given else args.checkpoint_dtype,
                      "ceilings": {"bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9},
                      "machine": host, "software": software,
                      "models": summaries}))


if __name__ == "__main__":
    main()
