"""Shared test helpers: where the real test data lives, and whether the references are installed.

Tests that need `../shared/data` or torch/transformers skip with a reason on a user's clone,
and fail where CI is set (CI has both, so a skip there would hide a broken install).
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
IN_CI = bool(os.environ.get("CI"))


def _unavailable(reason):
    if IN_CI:
        pytest.fail(f"{reason} (CI must have it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (the real tokenizers, token vectors and SmolLM2 GGUF)."""
    if not SHARED_DATA.is_dir():
        _unavailable(f"{SHARED_DATA} is not here (only CI and the team's machines have it)")
    return SHARED_DATA


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
