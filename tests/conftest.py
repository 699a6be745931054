"""Shared set-up: one torch thread per test process, the slowest files first, and tiny random-weight models
written once per checkout (tests/fixtures/, git-ignored)."""

from __future__ import annotations

import builtins
import errno
import fcntl
import io
import os
from pathlib import Path

import pytest

# One thread in every test process and in the processes the tests start (CLI runs, Ray workers, DDP ranks): the
# networks are tiny, `make test` runs one pytest worker per core (pytest-xdist), and OpenMP threads that
# outnumber the cores stall for seconds.
os.environ["OMP_NUM_THREADS"] = "1"

FIXTURES = Path(__file__).parent / "fixtures"

# Files whose tests take the longest: started first, so that the workers finish together.
SLOWEST_FIRST = ("test_standin.py", "test_perf.py", "test_batch.py", "test_particles_3d.py", "test_viewer.py",
                 "test_sd_pipeline.py", "test_resume.py", "test_distributed.py", "test_benchmarks.py", "test_stages.py",
                 "test_shape.py", "test_toy2d.py")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Paths of the tiny models from ``make_fixtures.make_all`` (dinov2, clip, sd, taesd, shap_e), built on first
    use; a lock file lets parallel test workers wait for the one that builds them."""
    from make_fixtures import make_all

    FIXTURES.mkdir(exist_ok=True)
    with open(FIXTURES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
