"""Every user error the package defines reaches the command line as one line and exit 2, before any run folder."""

import importlib
import inspect
import pkgutil

import pytest
from typer.testing import CliRunner

import recdreamer_gs
from recdreamer_gs.cli import app
from recdreamer_gs.errors import UserError


def user_error_classes() -> list[type[UserError]]:
    """UserError and all its subclasses (recursively) in every module of the package."""
    for info in pkgutil.walk_packages(recdreamer_gs.__path__, "recdreamer_gs."):
        importlib.import_module(info.name)
    seen: set[type] = set()
    todo = [UserError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def make(cls: type[UserError], message: str) -> UserError:
    """An instance with ``message``; extra required arguments (e.g. ModelUnavailable's cause) get strings."""
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cls(message, *["a cause"] * (len(params) - 1)) if params else cls(message)


def one_line_exit_2(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


def test_the_walk_finds_the_error_classes():
    names = {cls.__name__ for cls in user_error_classes()}
    assert {"UserError", "ConfigError", "PlyError", "InitError", "ModelUnavailable", "RunError", "GsplatUnavailable",
            "MeshError", "ReportError", "TemplateError", "ShapeError"} <= names


@pytest.mark.parametrize("cls", user_error_classes(), ids=lambda c: c.__name__)
def test_every_user_error_is_one_line_and_no_run_folder(cls, tmp_path, monkeypatch):
    from recdreamer_gs import training

    def build_prior(cfg, device, starting_shape=False):
        raise make(cls, f"{cls.__name__} raised while the prior loads; do this instead")

    monkeypatch.setattr(training, "build_prior", build_prior)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "a cat", "--out", str(out), "--device", "cpu"])
    one_line_exit_2(result, f"{cls.__name__} raised while the prior loads")
    assert not out.exists()


def test_os_error_is_one_line(tmp_path, monkeypatch):
    from recdreamer_gs import training

    def build_prior(cfg, device, starting_shape=False):
        raise PermissionError(13, "Permission denied", "/some/cache/file")

    monkeypatch.setattr(training, "build_prior", build_prior)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "a cat", "--out", str(out), "--device", "cpu"])
    one_line_exit_2(result, "/some/cache/file: Permission denied")
    assert not out.exists()


def test_classify_errors_are_one_line(tmp_path):
    from PIL import Image

    from recdreamer_gs.pose.templates import write_template_folder

    image = tmp_path / "view.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    import torch

    templates = tmp_path / "templates"
    write_template_folder({c: [torch.rand(3, 32, 32) * 2 - 1] for c in ("front", "side", "back")}, templates)
    runner = CliRunner()
    cases = [
        (["classify", str(image), "--templates", str(tmp_path / "none")], "--templates: folder"),
        (["classify", str(image), "--templates", str(empty)], str(empty)),
        # A classifier config whose DINOv2 cannot be had: the model error, before anything loads.
        (["classify", str(image), "--templates", str(templates), "--pose-model", str(tmp_path / "no-dino")],
         "no-dino"),
        (["classify", str(image), "--prior", "synthetic", "--device", "cpu", "--templates", str(templates),
          "--pose-model", str(tmp_path / "no-dino")], "no-dino"),
        (["classify", str(broken), "--prior", "synthetic", "--device", "cpu"], "broken.png cannot be read"),
        (["classify", str(image)], "give --templates DIR"),
    ]
    for args, fragment in cases:
        one_line_exit_2(runner.invoke(app, args), fragment)
