"""Shared test fixtures. Run the tests from the repository root: python -m pytest"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# So that `import pipeline` works however pytest is started.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fake_cifar import write_fake_cifar10  # noqa: E402


@pytest.fixture(scope="session")
def fake_cifar_dir(tmp_path_factory) -> Path:
    """A dataset dir holding a tiny synthetic cifar-10-batches-py (200 train, 100 test images)."""
    return write_fake_cifar10(tmp_path_factory.mktemp("fake_cifar"))
