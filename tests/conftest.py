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


@pytest.fixture(scope="session")
def vpred_folder(tiny_models, tmp_path_factory) -> Path:
    """The tiny SD folder with a v-prediction schedule (like SD 2.1-768)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("vpred") / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    return folder
