"""The test suite itself: on a clone with only requirements.txt and pytest installed, every test
module still collects (the tests that need torch, transformers or gguf skip, with the reason)."""

import os
import subprocess
import sys

from conftest import ROOT

TEST_ONLY = ("torch", "transformers", "accelerate", "gguf")  # what requirements-dev.txt adds


def test_every_module_collects_without_the_test_only_packages():
    # pytest in a child process where importing any of them fails as if it were not installed
    blocked = f"import sys; sys.modules.update(dict.fromkeys({TEST_ONLY!r}))"
    run = f"{blocked}; import pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider']))"
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # outside CI a missing package skips
    result = subprocess.run([sys.executable, "-c", run], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.splitlines()[-1], result.stdout[-3000:]
