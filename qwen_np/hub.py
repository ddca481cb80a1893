"""Where a model is: a local path (a checkpoint directory or a .gguf file), or a Hub id such as
"Qwen/Qwen3-0.6B" naming that model's copy in the Hugging Face cache. Nothing is downloaded here.
"""

import os
import re
from pathlib import Path

from .config import QwenNPError

HUB_PART = r"\w[\w.-]*"  # an owner, a repository, a folder or a file name on the Hub


def is_gguf_file(path):  # a GGUF file, which `load` reads as one (the benchmark too)
    # Named *.gguf, or starting with GGUF's magic bytes: Ollama keeps its models as files named by
    # their checksum (~/.ollama/models/blobs/sha256-...).
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def hub_id(name):  # -> ("Qwen/Qwen3-0.6B", "" or a file of it), or None for what can only be a path
    # owner/name, or owner/name/[folder/]file.gguf of a GGUF repository; not "./a/b", "~/x", "a/b/c", "a/b.gguf"
    P = HUB_PART
    m = re.fullmatch(rf"({P}/{P})(?:/((?:{P}/)*{P}\.gguf))?", name, re.ASCII | re.IGNORECASE)
    if m is None or (m[2] is None and name.lower().endswith(".gguf")):
        return None
    return m[1], m[2] or ""


def hub_cache():  # -> the Hugging Face Hub's cache directory, found as huggingface_hub finds it
    def path(variable):  # huggingface_hub expands $VARS and ~ in these
        return Path(os.path.expandvars(os.environ[variable])).expanduser()

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is its older name
        if os.environ.get(variable):
            return path(variable)
    if os.environ.get("HF_HOME"):
        return path("HF_HOME") / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return path("XDG_CACHE_HOME") / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def expanded(name):  # -> Path(name) with a leading ~ or ~user expanded where it can be
    try:
        return Path(name).expanduser()
    except RuntimeError:  # "~someone/..." for a user who does not exist: the path as written
        return Path(name)


def model_location(name):  # -> the Path `name` (~ expanded) if it exists, else a Hub id's cached copy, else None
    path = expanded(name)
    return path if path.exists() else hub_cache_model(str(name))


def hub_cache_model(name):  # -> where Hub id `name` is in the Hub's cache, or None (nothing is downloaded)
    if (parts := hub_id(name)) is None:
        return None
    repo, file = parts
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"  # the layout: refs/main, snapshots/<commit>/
    main = folder / "refs" / "main"  # holds the commit of the main branch when it was last downloaded
    commit = main.read_text("utf-8", errors="replace").strip() if main.is_file() else ""
    snapshot = folder / "snapshots" / commit
    if not (commit and snapshot.is_dir()):  # no usable refs/main: only a lone snapshot is unambiguous
        snapshots = sorted(p for p in folder.glob("snapshots/*") if p.is_dir())
        if not snapshots:
            return None
        if len(snapshots) > 1:  # downloaded at several commits, none of them known as main's: which is wanted?
            raise QwenNPError(f"{name}: the Hugging Face cache holds {len(snapshots)} snapshots of {repo} and no "
                              f"refs/main to choose one; pass one of them: {folder / 'snapshots' / '<commit>' / file}"
                              f" ({', '.join(p.name for p in snapshots[:5])})")
        snapshot = snapshots[0]
    return snapshot / file if (snapshot / file).exists() else None


def hub_hint(name):  # -> how to fetch `name` if it looks like a Hub id ("Qwen/Qwen3-0.6B"), else ""
    if (parts := hub_id(name)) is None:
        return ""
    command = " ".join(filter(None, parts))  # hf download Qwen/Qwen3-0.6B, or ... REPO FILE.gguf
    return (f" (nor is it in the Hugging Face cache, {hub_cache()}; qwen_np reads local files only. To fetch "
            f"{name} from the Hub: pip install -U huggingface_hub, then hf download {command}, and pass {name} again)")
