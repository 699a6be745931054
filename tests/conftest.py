"""Shared fixtures: tiny random-weight models written once per checkout (tests/fixtures/, git-ignored)."""

from __future__ import annotations

import builtins
import errno
import io
import os
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


class _FullFile:
    """A file opened for writing on a full disk: each write stores part of its data, then fails (ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it: no file name

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FullDisk:
    """``fill()`` the disk: from then on every file opened for writing through ``open``/``io.open`` (our writers,
    pathlib, zipfile, gsply, sogpy, Lightning through fsspec) fails part-way; ``free()`` undoes it."""

    def __init__(self):
        self.full = False

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False

    def wrap(self, f, mode: str):
        return _FullFile(f) if self.full and any(c in mode for c in "wax+") else f


@pytest.fixture
def full_disk(monkeypatch) -> FullDisk:
    disk = FullDisk()
    real_open = io.open
    fake_open = lambda file, mode="r", *a, **k: disk.wrap(real_open(file, mode, *a, **k), mode)  # noqa: E731
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # os.fdopen and pathlib open through io.open
    return disk
