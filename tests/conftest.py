"""Shared test helpers: where the real test data lives, whether the references are installed, and
what pages a loaded model's weights sit in.

Tests that need `../shared/data` or torch/transformers skip with a reason on a user's clone,
and fail where CI is set (CI has both, so a skip there would hide a broken install).
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")  # CI=true, CI=1; not CI=false


def _unavailable(reason):  # in a test, or while a test module is imported (then for the whole module)
    if IN_CI:
        pytest.fail(f"{reason} (CI must have it)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (the real tokenizers, token vectors and SmolLM2 GGUF)."""
    if not SHARED_DATA.is_dir():
        _unavailable(f"{SHARED_DATA} is not here (only CI and the team's machines have it)")
    return SHARED_DATA


def require_module(name):
    """Imports a test-only package (gguf: llama.cpp's writer and reader), or skips the test module
    that needs it (fails in CI) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        _unavailable(f"{name} is not installed ({e}); pip install -r requirements-dev.txt")


def require_reference():
    """Imports torch and transformers, or skips (fails in CI) when they are not installed."""
    try:
        import torch
        import transformers
    except ImportError as e:
        _unavailable(f"the reference is not installed ({e}); pip install -r requirements-dev.txt")
    torch.manual_seed(0)
    return torch, transformers


@pytest.fixture
def reference():
    return require_reference()


# A text that exercises a tokenizer: code, spacing, CJK, accents, emoji sequences, special tokens.
VARIED_TEXT = ("<|im_start|>user\nHello, world! It's 2024; isn't it?  Tabs\tand   spaces.\n\n"
               "def f(x):\n    return x ** 2  # squares 12345\n"
               "我想在北京工作，你好世界。 Émilie's café — naïve 🦙🚀😀 👨‍👩‍👧 (multiple emojis)\n"
               "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")


HUGE_PAGES = """
import sys
import numpy as np
import qwen_np

def huge_kb(a):  # the AnonHugePages of the mappings that hold array `a`, in kB
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if not first.endswith(":"):  # a mapping's own line: start-end perms offset ...
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start < a.ctypes.data + a.nbytes and a.ctypes.data < end
        elif inside and first == "AnonHugePages:":
            total += int(line.split()[1])
    return total

control = np.ones(8 << 20, np.float32)  # 32 MB from NumPy, which advises huge pages
weight = qwen_np.load(sys.argv[1]).params["model"]["embed_tokens"]["weight"]  # 8 MB
print(huge_kb(control), huge_kb(weight))
"""


def embeddings_huge_page_kb(path):
    """kB of huge pages under the embeddings of the model at `path`, loaded in a fresh process;
    skips where only "madvise" mode would tell them apart, or NumPy's own arrays get none either."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.is_file() or "[madvise]" not in mode.read_text():
        # "always" gives every large mapping huge pages, the loader's too (the system's default);
        # "never" gives none: only "madvise" tells NumPy's advised arrays from the loader's.
        pytest.skip("transparent huge pages are not in 'madvise' mode here (or this is not Linux): nothing to compare")
    done = subprocess.run([sys.executable, "-c", HUGE_PAGES, str(path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NUMPY_MADVISE_HUGEPAGE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    control, weight = map(int, done.stdout.split())
    if control == 0:
        pytest.skip("this system gives NumPy's arrays no huge pages (transparent_hugepage 'never'?): "
                    "nothing to compare")
    return weight
