"""The output table (recdreamer_gs.outputs): every format's writer, read back by its own library."""

from __future__ import annotations

import errno
import json
import zipfile
from pathlib import Path

import gsply
import numpy as np
import pytest
import torch
from gsply.sog_reader import sogread

from recdreamer_gs.export import prepare_for_export, read_ply
from recdreamer_gs.gaussians import SH_C0
from recdreamer_gs.outputs import (
    OUTPUTS,
    SOG_MIN_GAUSSIANS,
    FormatError,
    output_for,
    output_named,
    write_sog,
)

GAUSSIAN_FORMATS = [o.name for o in OUTPUTS if o.kind == "gaussians"]


def make_params(n: int, sh_degree: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A model in the unit cube with colours spread over [0, 1] (internal y-up frame)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.rand(n, 3, generator=g) * 2 - 1,
        "scales": torch.randn(n, 3, generator=g) * 0.3 - 3.5,
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": (torch.rand(n, 1, 3, generator=g) - 0.5) / SH_C0,
        "shN": torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=g) * 0.1,
    }


def read_back(path: Path) -> dict[str, np.ndarray]:
    """A file of the table, read with the library that reads its format, in PLY conventions (viewer frame)."""
    if path.suffix == ".ply":
        return {"means": read_ply(path, frame="y-up")["means"].numpy()}  # the stored values
    if path.suffix == ".splat":
        rows = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, 32)
        return {"means": rows[:, :12].copy().view("<f4").reshape(-1, 3)}
    data = gsply.read_spz(path) if path.suffix == ".spz" else sogread(path)
    return {"means": data.means, "scales": data.scales, "quats": data.quats, "opacities": data.opacities,
            "sh0": data.sh0, "shN": data.shN}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("name", ["spz", "sog"])
def test_compressed_formats_read_back_within_their_quantisation(tmp_path: Path, name: str) -> None:
    n = 2000
    params = make_params(n, sh_degree=1)
    path = tmp_path / f"model.{name}"
    written = output_named(name).write(path, params, "viewer")
    assert (written.gaussians, written.dropped, written.note) == (n, 0, "")
    back = read_back(path)
    assert len(back["means"]) == n and back["shN"].shape == (n, 3, 3)
    # The values model.ply holds: the viewer frame, (x, y, z) -> (x, -y, -z), quaternions and SH bands rotated.
    ref = {k: v.numpy() for k, v in prepare_for_export(params, "viewer").items()}
    np.testing.assert_allclose(ref["means"], params["means"].numpy() * [1, -1, -1])
    ref["sh0"] = ref["sh0"].reshape(n, 3)
    if name == "spz":  # rows in file order
        order = np.arange(n)
        # gsply.spz / Niantic load-spz.cc: positions in steps of 1/4096 (rounded), colour bytes of
        # sh0 * 0.15 * 255 (rounded), opacity bytes of sigmoid(opacity) * 255 (rounded), 9-bit quaternions.
        position_error = np.full((n, 3), 0.5 / 4096)
        colour_error, opacity_error, min_dot = 0.5 / (0.15 * 255) * SH_C0, 0.5 / 255, 0.9999
    else:  # SOG stores Morton order: match rows by position
        order = torch.cdist(torch.from_numpy(back["means"]), torch.from_numpy(ref["means"])).argmin(dim=1).numpy()
        assert len(np.unique(order)) == n
        # sogpy / PlayCanvas SOG: 16 bits of sign(x) log(|x| + 1) over each axis's range (truncated), colours as
        # 8-bit indices into a 256-entry codebook, opacity bytes of sigmoid(opacity) * 255 (truncated).
        meta = json.loads(zipfile.ZipFile(path).read("meta.json"))
        step = (np.array(meta["means"]["maxs"]) - meta["means"]["mins"]) / 65535
        position_error = (1 + np.abs(ref["means"][order])) * np.expm1(step)
        colour_error, opacity_error, min_dot = 1 / 255, 1 / 255, 0.999
    # (+ 1e-6: the float32 arithmetic of the readers, e.g. exp(a) - 1 near 2 has an ulp of 2.4e-7)
    assert (np.abs(back["means"] - ref["means"][order]) <= position_error + 1e-6).all()
    rgb_error = SH_C0 * np.abs(back["sh0"] - ref["sh0"][order])
    assert rgb_error.max() <= colour_error + 1e-6
    assert np.abs(sigmoid(back["opacities"]) - sigmoid(ref["opacities"][order])).max() <= opacity_error + 1e-6
    assert np.abs((back["quats"] * ref["quats"][order]).sum(1)).min() >= min_dot
    if name == "spz":
        assert np.abs(back["scales"] - ref["scales"]).max() <= 1 / 32 + 1e-6  # log scale bytes of (s + 10) * 16
        assert np.abs(back["shN"] - ref["shN"]).max() <= 0.5 / 128 + 1e-6  # SH bytes of sh * 128 + 128
    output_named("ply").write(tmp_path / "model.ply", params, "viewer")
    assert path.stat().st_size * 5 < (tmp_path / "model.ply").stat().st_size


@pytest.mark.parametrize("name", GAUSSIAN_FORMATS)
def test_non_finite_gaussians_are_left_out_and_counted(tmp_path: Path, name: str) -> None:
    params = make_params(100, sh_degree=1)
    params["means"][1, 0] = float("nan")
    params["scales"][2, 1] = float("inf")
    params["shN"][3, 2, 0] = float("-inf")
    path = tmp_path / f"model.{name}"
    written = output_named(name).write(path, params, "viewer")
    assert (written.gaussians, written.dropped) == (97, 3)
    assert "3 with non-finite values left out" in written.describe()
    back = read_back(path)
    assert len(back["means"]) == 97 and np.isfinite(back["means"]).all()


@pytest.mark.parametrize("name", GAUSSIAN_FORMATS)
def test_a_failed_write_leaves_the_previous_file_and_nothing_else(tmp_path: Path, name: str, full_disk) -> None:
    path = tmp_path / f"model.{name}"
    path.write_bytes(b"the last good model")
    full_disk.fill()
    with pytest.raises(OSError) as info:
        output_named(name).write(path, make_params(100), "viewer")
    full_disk.free()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)  # the file, not a temp name
    assert path.read_bytes() == b"the last good model"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_table_lookups(tmp_path: Path) -> None:
    assert [o.name for o in OUTPUTS if o.kind == "gaussians"] == ["ply", "splat", "spz", "sog"]
    assert output_for("a/model.SPZ").name == "spz"
    assert output_for("m.ply").kind == "gaussians" and output_for("m.ply", mesh=True).kind == "mesh"
    assert output_for("m.glb").kind == "mesh"
    with pytest.raises(FormatError, match=r"ending in .glb, .obj, .ply, .sog, .splat, .spz, got .stl"):
        output_for("m.stl")
    with pytest.raises(FormatError, match="unknown gaussians format 'las'"):
        output_named("las")


def test_sog_needs_enough_gaussians(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=f"at least {SOG_MIN_GAUSSIANS} Gaussians"):
        write_sog(tmp_path / "m.sog", make_params(SOG_MIN_GAUSSIANS - 1))
    assert list(tmp_path.iterdir()) == []
    # Fewer than 1,024 Gaussians: sogpy cannot palette the SH bands; the file keeps the DC colour and says so.
    written = write_sog(tmp_path / "m.sog", make_params(SOG_MIN_GAUSSIANS, sh_degree=2))
    assert written.gaussians == SOG_MIN_GAUSSIANS and "SH bands beyond DC left out" in written.note
    assert sogread(tmp_path / "m.sog").shN is None or sogread(tmp_path / "m.sog").shN.size == 0
