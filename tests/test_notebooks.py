"""The notebooks: each runs top to bottom in a fresh kernel (the asserts inside are real checks),
none defines a function named like one of qwen_np's, and each committed notebook is the saved
result of a clean top-to-bottom run, with what-you-will-learn and recap cells, showing the
package's current source wherever it prints it."""

import ast
import importlib
import inspect
import pkgutil
import re

import pytest

import qwen_np
from conftest import IN_CI, ROOT, require_reference

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
MODEL = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"  # in ../shared/data
CELL_TIMEOUT = 300  # seconds; a notebook takes under two minutes in all


def notebook_tools():
    """nbformat and nbclient's NotebookClient, or a skip (a failure in CI) when not installed."""
    try:
        import ipykernel  # noqa: F401  (the kernel the notebooks run in)
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        message = f"the notebook tools are not installed ({e}); pip install -r requirements-dev.txt"
        if IN_CI:
            pytest.fail(f"{message} (CI must have them)")
        pytest.skip(message)
    return nbformat, NotebookClient


def read(path):
    nbformat, _ = notebook_tools()
    return nbformat.read(path, as_version=4)


def test_the_series_is_there():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 15)], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, shared_data, monkeypatch):
    _, NotebookClient = notebook_tools()
    monkeypatch.setenv("QWEN_NP_MODEL", str(shared_data / MODEL))  # the kernel inherits it: no download
    notebook = read(path)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, showing the failing cell, on any error or failed assert


QWEN_SIZES = dict(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen_checkpoint(request, shared_data, tmp_path_factory):
    """A small random checkpoint of a Qwen family with its real tokenizer, which is what a learner points
    QWEN_NP_MODEL at (with 12 layers: some cells look at layer 10; a Qwen has 24 or more)."""
    import shutil

    from tiny import tiny_model
    torch, _ = require_reference()
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    head_dim = {"head_dim": 128} if family == "qwen3" else {}  # Qwen3's, wider than hidden / heads
    tiny_model(family, directory, dtype=torch.bfloat16, **QWEN_SIZES, **head_dim)
    tokenizer = shared_data / ("qwen3-tokenizer" if family == "qwen3" else "qwen2.5-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, directory / name)
    return directory


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if not p.name.startswith("13_")],  # 13: a GGUF file only
                         ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_on_a_qwen_checkpoint(path, qwen_checkpoint, monkeypatch):
    # The course is written against SmolLM2 (a llama GGUF): it must not depend on that model.
    _, NotebookClient = notebook_tools()
    monkeypatch.setenv("QWEN_NP_MODEL", str(qwen_checkpoint))
    NotebookClient(read(path), timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()


def import_setup(monkeypatch):  # -> the notebooks' _setup module, NumPy's print options left as they were
    import numpy as np
    printing = np.get_printoptions()
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    setup = importlib.import_module("_setup")  # which sets the notebooks' print options
    np.set_printoptions(**printing)
    return setup


DENSE_ONLY = ("01", "06", "07", "11", "14")  # the notebooks that take a layer's MLP apart


def test_a_notebook_that_takes_the_mlp_apart_refuses_a_mixture_of_experts_model(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qwen_np.config import config_from_dict
    setup = import_setup(monkeypatch)
    moe = config_from_dict(dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=16))
    monkeypatch.setattr(qwen_np, "load", lambda path: SimpleNamespace(config=moe))
    monkeypatch.setenv("QWEN_NP_MODEL", str(tmp_path / "moe"))
    with pytest.raises(qwen_np.QwenNPError, match=r"moe is a mixture-of-experts model \(qwen3_moe, 4 experts\): "
                                                  r"this notebook takes a layer's dense MLP apart.*notebook 09"):
        setup.load_model(dense=True)
    assert setup.load_model().config is moe  # the other notebooks take it
    for path in NOTEBOOKS:  # a mixture of experts stops the dense-only ones at their first cell, not deep inside
        source = path.read_text()
        assert ("load_model(dense=True)" in source) == path.name.startswith(DENSE_ONLY), path.name


def test_notebook_13_takes_the_default_gguf_apart_when_the_model_is_not_a_gguf(tmp_path, monkeypatch, capsys):
    import qwen_np.download
    setup = import_setup(monkeypatch)
    monkeypatch.setattr(qwen_np.download, "default_model_path", lambda: tmp_path / "default.gguf")  # no download
    (tmp_path / "Qwen3-0.6B").mkdir()  # a checkpoint directory
    for name, what in (("Qwen3-0.6B", "not a GGUF file"), ("Qwen3-0.6B-typo", "which does not exist")):
        monkeypatch.setenv("QWEN_NP_MODEL", str(tmp_path / name))
        assert setup.gguf_path() == tmp_path / "default.gguf"
        assert capsys.readouterr().out == (f"QWEN_NP_MODEL names {tmp_path / name}, {what}: this notebook takes "
                                           f"apart the out-of-the-box default.gguf instead\n")
    monkeypatch.setenv("QWEN_NP_MODEL", str(tmp_path / "qwen3-0.6b-q8_0.gguf"))
    assert setup.gguf_path() == tmp_path / "qwen3-0.6b-q8_0.gguf" and capsys.readouterr().out == ""
    (tmp_path / "sha256-0123").write_bytes(b"GGUF\x03\x00\x00\x00")  # Ollama keeps GGUFs without the suffix
    monkeypatch.setenv("QWEN_NP_MODEL", str(tmp_path / "sha256-0123"))
    assert setup.gguf_path() == tmp_path / "sha256-0123" and capsys.readouterr().out == ""
    assert "path = gguf_path()" in (NOTEBOOK_DIR / "13_gguf_files.ipynb").read_text()


def test_a_failed_tokenizer_fetch_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    # Notebooks 02 and 08 fetch Qwen's tokenizer files when ../shared/data is not beside the checkout.
    import urllib.error
    import urllib.request

    setup = import_setup(monkeypatch)
    monkeypatch.setattr(setup, "SHARED_DATA", tmp_path / "no-shared-data")
    monkeypatch.setenv("QWEN_NP_CACHE", str(tmp_path / "new" / "cache"))  # two folders to create

    import http.client
    for error, reason in ((urllib.error.URLError("[Errno -2] Name or service not known"),
                           "[Errno -2] Name or service not known"),
                          (http.client.IncompleteRead(b"{"), "IncompleteRead(1 bytes read)")):
        def cut_short(url, filename):
            open(filename, "w").close()  # a transfer that started, then failed
            raise error

        monkeypatch.setattr(urllib.request, "urlretrieve", cut_short)
        with pytest.raises(qwen_np.QwenNPError, match=re.escape(
                f"could not fetch https://huggingface.co/Qwen/Qwen3-0.6B/resolve/main/tokenizer.json ({reason}). "
                f"This notebook needs Qwen/Qwen3-0.6B's tokenizer.json and tokenizer_config.json once")):
            setup.qwen_tokenizer_dir("qwen3")
        assert not (tmp_path / "new").exists()  # no half file, and no folder made for it


def public_functions():
    """{name: module} of every public function defined in a qwen_np module."""
    names = {}
    for info in pkgutil.iter_modules(qwen_np.__path__):
        if info.name.startswith("_"):  # __main__ would run the command line
            continue
        module = importlib.import_module(f"qwen_np.{info.name}")
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if not name.startswith("_") and function.__module__ == module.__name__:
                names[name] = module.__name__
    return names


def defined_functions(source):
    """Names that a cell's code defines as functions: `def name` or `name = lambda ...`."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Lambda):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def test_the_name_check_catches_a_redefinition():
    cell = "def rms_norm(x, weight, eps):\n    return x\nsoftmax = lambda x: x\ndef helper(): pass"
    assert defined_functions(cell) == ["rms_norm", "softmax", "helper"]
    assert {"rms_norm", "softmax", "apply_rope", "forward", "top_p_filter"} <= set(public_functions())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_defines_no_function_named_like_qwen_np(path):
    package = public_functions()
    clashes = [f"cell {i} defines {name!r}, a function of {package[name]}"
               for i, cell in enumerate(read(path).cells) if cell.cell_type == "code"
               for name in defined_functions(cell.source) if name in package]
    assert not clashes, f"{path.name}: import it from qwen_np instead: {'; '.join(clashes)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_a_clean_run(path):
    cells = read(path).cells
    code = [c for c in cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name} was not saved from one clean top-to-bottom run"
    errors = [i for i, c in enumerate(code) if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: code cells {errors} were saved with an error"
    assert cells[0].cell_type == "markdown" and "What you will learn" in cells[0].source
    assert cells[-1].cell_type == "markdown" and cells[-1].source.startswith("## Recap")


def printed_sources(path):  # -> [(cell index, name, saved output)] of the cells printing a function's source
    found = []
    for i, cell in enumerate(read(path).cells):
        shown = re.fullmatch(r"print\(inspect\.getsource\(([\w.]+)\)\)", cell.source.strip())
        if cell.cell_type == "code" and shown:
            found.append((i, shown.group(1), "".join(o.get("text", "") for o in cell.outputs)))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_sources_a_notebook_shows_are_the_packages_current_ones(path):
    # A notebook saved before an operator changed would teach code the package no longer has.
    package = public_functions()
    stale = []
    for i, name, shown in printed_sources(path):
        if name.startswith("qwen_np."):  # qwen_np.KVCache
            obj = getattr(qwen_np, name.removeprefix("qwen_np."))
        elif name in package:
            obj = getattr(importlib.import_module(package[name]), name)
        else:  # a helper of the notebooks' own _setup.py
            continue
        if shown.rstrip("\n") != inspect.getsource(obj).rstrip("\n"):
            stale.append(f"cell {i} ({name})")
    assert not stale, f"{path.name} shows old source in {', '.join(stale)}: run it again and save it"


def test_the_printed_sources_are_found():  # the check above is not vacuous
    assert sum(len(printed_sources(path)) for path in NOTEBOOKS) >= 25


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"README.md does not list {missing}"
