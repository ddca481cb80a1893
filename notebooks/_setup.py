"""What every notebook shares, in one place: which model to load, where the real test data
lives, and the residual stream layer by layer. Each notebook imports it first.

The model is the one named by the QWEN_NP_MODEL environment variable when it is set (what
qwen_np.load takes: a GGUF file, a checkpoint directory, a Hub id in the Hugging Face cache),
otherwise the out-of-the-box model that `qwen_np.download.default_model_path()` returns
(downloaded once, then cached).
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the checkout: lets a clone import qwen_np uninstalled
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qwen_np  # noqa: E402
from qwen_np.model import attention_inputs, decoder_layer, empty_cache  # noqa: E402
from qwen_np.ops import embedding  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"  # the team's real test data, beside the checkout
np.set_printoptions(precision=4, suppress=True, linewidth=110)


def model_path():
    """QWEN_NP_MODEL when set (a Hub id: its copy in the Hugging Face cache), otherwise the out-of-the-box model."""
    if os.environ.get("QWEN_NP_MODEL"):
        name = os.environ["QWEN_NP_MODEL"]
        return qwen_np.model_location(name) or Path(name).expanduser()
    from qwen_np.download import default_model_path
    return Path(default_model_path())


def gguf_path():
    """model_path() when it is a GGUF file, otherwise the out-of-the-box GGUF, saying so (notebook 13
    takes a GGUF file apart: a checkpoint directory has none)."""
    path = model_path()
    # A .gguf name is kept even where no file has it (the notebook then names the missing file);
    # is_gguf_file also knows a GGUF by its first bytes (an Ollama blob has no suffix).
    if path.suffix.lower() == ".gguf" or qwen_np.is_gguf_file(path):
        return path
    from qwen_np.download import default_model_path
    default = Path(default_model_path())
    what = "not a GGUF file" if path.exists() else "which does not exist"
    print(f"QWEN_NP_MODEL names {path}, {what}: this notebook takes apart the out-of-the-box {default.name} "
          f"instead")
    return default


def load_model(dense=False):
    """qwen_np.load(model_path()), saying what was loaded and how long it took. A notebook that
    takes a layer's MLP apart asks for a `dense` model: a mixture-of-experts one is refused."""
    path = model_path()
    start = time.perf_counter()
    model = qwen_np.load(path)
    c = model.config
    if dense and c.num_experts:
        raise qwen_np.QwenNPError(
            f"{path} is a mixture-of-experts model ({c.model_type}, {c.num_experts} experts): this notebook takes "
            f"a layer's dense MLP apart. Run it with a dense model (unset QWEN_NP_MODEL for the default one); "
            f"notebook 09 is the one about experts")
    print(f"{path.name}: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} query / {c.num_key_value_heads} key-value heads, vocab {c.vocab_size} "
          f"(loaded in {time.perf_counter() - start:.1f} s)")
    return model


def residual_stream(model, input_ids):  # [B, T] -> [L + 1] x [B, T, D]
    """The embeddings, then the hidden state after every decoder layer: the same steps as
    qwen_np.forward on a fresh prompt, stopping before the final norm."""
    config, params = model.config, model.params
    B, T = input_ids.shape
    cache = empty_cache(config, B, T)
    cos, sin, masks = attention_inputs(config, np.ones((B, T), bool), T)  # RoPE [B, T, Dh] x2, masks [B, 1, T, T]
    x = embedding(input_ids, params["model"]["embed_tokens"]["weight"])  # [B, T, D]
    states = [x]
    for i, layer in enumerate(params["model"]["layers"]):
        mask = masks[config.layer_types[i]]
        x, _ = decoder_layer(x, layer, config, cos, sin, mask, cache.keys[i], cache.values[i], 0)
        states.append(x)
    return states


def qwen_tokenizer_dir(family="qwen3"):
    """A directory with a real Qwen tokenizer.json and tokenizer_config.json: the team's copy in
    ../shared/data when it is there, otherwise fetched once from the Hugging Face Hub."""
    local = SHARED_DATA / f"{family}-tokenizer"
    if (local / "tokenizer.json").is_file():
        return local
    from qwen_np.download import cache_dir, removed_if_failed
    repo = {"qwen3": "Qwen/Qwen3-0.6B", "qwen2.5": "Qwen/Qwen2.5-0.5B-Instruct"}[family]
    cache = cache_dir().resolve() / f"{family}-tokenizer"
    with removed_if_failed(cache):  # a failed fetch leaves no folder it made either
        cache.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (cache / name).is_file():
                fetch_file(f"https://huggingface.co/{repo}/resolve/main/{name}", cache / name, repo)
    return cache


def fetch_file(url, path, repo):
    """Downloads url to path, renamed into place only once complete: a failed fetch leaves no half file."""
    import http.client
    import urllib.request
    part = path.with_name(f".{path.name}.part")
    try:
        urllib.request.urlretrieve(url, part)
        part.replace(path)
    except (OSError, http.client.HTTPException) as e:  # no network or DNS, an HTTP error, a cut transfer
        raise qwen_np.QwenNPError(
            f"could not fetch {url} ({getattr(e, 'reason', None) or repr(e)}). This notebook needs "
            f"{repo}'s tokenizer.json and tokenizer_config.json once: connect and run it again, or "
            f"put the two files in a folder {path.parent}") from None
    finally:
        part.unlink(missing_ok=True)
