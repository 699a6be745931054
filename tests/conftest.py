"""Shared fixtures: tiny random-weight models written once per checkout (tests/fixtures/, git-ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Paths of the tiny models from ``make_fixtures.make_all`` (dinov2, clip, sd), built on first use."""
    from make_fixtures import make_all

    return make_all(FIXTURES)
