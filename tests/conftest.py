"""Shared test fixtures, found by every test folder. Run the tests from the repository root: python -m pytest"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_fake_cifar10


@pytest.fixture(scope="session")
def fake_cifar_dir(tmp_path_factory) -> Path:
    """A dataset dir holding a tiny synthetic cifar-10-batches-py (200 train, 100 test images)."""
    return write_fake_cifar10(tmp_path_factory.mktemp("fake_cifar"))
