"""PLY / .splat export and PLY reading (recdreamer_gs.export)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import plyfile
import pytest
import torch
from gsplat.cuda._torch_impl import _quat_to_rotmat, _spherical_harmonics

from recdreamer_gs.export import (
    PLY_PROPERTIES,
    PlyError,
    atomic_write_bytes,
    read_ply,
    rotate_x180,
    write_ply,
    write_splat,
)


def make_params(n: int = 64, sh_degree: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2 - 1
    return {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 3.0,
        "quats": torch.randn(n, 4, generator=g) * 2.0,  # deliberately unnormalised
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, k, 3, generator=g),
    }


def split_header(path: Path) -> tuple[list[str], int]:
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    return data[:end].decode("ascii").splitlines(), end


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def same_rotation(q1: torch.Tensor, q2: torch.Tensor) -> None:
    """Equal up to normalisation and sign."""
    a = torch.nn.functional.normalize(q1, dim=-1)
    b = torch.nn.functional.normalize(q2, dim=-1)
    torch.testing.assert_close((a * b).sum(-1).abs(), torch.ones(len(a)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("frame", ["y-up", "viewer"])
@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_round_trip_keeps_values(tmp_path: Path, frame: str, sh_degree: int) -> None:
    params = make_params(sh_degree=sh_degree)
    path = tmp_path / "model.ply"
    assert write_ply(path, params, frame=frame).gaussians == 64
    back = read_ply(path, frame=frame, sh_degree=sh_degree)
    assert set(back) == set(params)
    for key in ("means", "scales", "opacities", "sh0", "shN"):
        assert back[key].shape == params[key].shape, key
        torch.testing.assert_close(back[key], params[key], atol=1e-6, rtol=1e-6, msg=key)
    same_rotation(back["quats"], params["quats"])
    # Stored quaternions are unit length.
    torch.testing.assert_close(back["quats"].norm(dim=-1), torch.ones(64), atol=1e-6, rtol=0)


def test_read_without_sh_degree_returns_all_coefficients(tmp_path: Path) -> None:
    params = make_params(sh_degree=1)
    write_ply(tmp_path / "m.ply", params, frame="y-up")
    back = read_ply(tmp_path / "m.ply", frame="y-up")
    assert back["shN"].shape == (64, 15, 3)  # the file always holds 45 f_rest (zero-padded)
    torch.testing.assert_close(back["shN"][:, :3], params["shN"])
    assert back["shN"][:, 3:].abs().max() == 0


def test_header_is_standard_inria_layout(tmp_path: Path) -> None:
    n = 37
    path = tmp_path / "m.ply"
    write_ply(path, make_params(n, sh_degree=0))
    lines, header_bytes = split_header(path)
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    assert lines[-1] == "end_header"
    props = lines[3:-1]
    assert all(line.startswith("property float ") for line in props)
    names = [line.split()[-1] for line in props]
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                + [f"f_rest_{i}" for i in range(45)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert names == expected == list(PLY_PROPERTIES)
    assert len(names) == 62
    assert not any(line.startswith(("comment", "obj_info")) for line in lines)
    assert path.stat().st_size == header_bytes + 248 * n
    # Normals zero and f_rest zero-padded for SH degree 0.
    rows = plyfile.PlyData.read(str(path))["vertex"].data
    for name in ["nx", "ny", "nz"] + [f"f_rest_{i}" for i in range(45)]:
        assert np.all(rows[name] == 0), name


def test_f_rest_is_channel_major(tmp_path: Path) -> None:
    params = make_params(4, sh_degree=3)
    write_ply(tmp_path / "m.ply", params, frame="y-up")
    rows = plyfile.PlyData.read(str(tmp_path / "m.ply"))["vertex"].data
    for c in range(3):
        for k in range(15):
            np.testing.assert_array_equal(rows[f"f_rest_{c * 15 + k}"], params["shN"][:, k, c].numpy())


def test_non_finite_rows_are_dropped_and_scales_clamped(tmp_path: Path) -> None:
    params = make_params(10, sh_degree=3)
    params["means"][1, 0] = float("nan")
    params["scales"][2, 1] = float("inf")
    params["opacities"][3] = float("nan")  # gsplat 1.5.3 would drop every row for this one
    params["shN"][4, 7, 2] = float("-inf")
    params["quats"][5, 0] = float("nan")
    params["scales"][6] = torch.tensor([-50.0, 0.0, 50.0])
    path = tmp_path / "m.ply"
    written = write_ply(path, params, frame="y-up")
    assert (written.gaussians, written.dropped) == (5, 5)
    back = read_ply(path, frame="y-up")
    keep = [0, 6, 7, 8, 9]
    torch.testing.assert_close(back["means"], params["means"][keep])
    torch.testing.assert_close(back["scales"][1], torch.tensor([-20.0, 0.0, 20.0]))
    assert all(torch.isfinite(v).all() for v in back.values())
    assert write_splat(tmp_path / "m.splat", params).gaussians == 5
    assert (tmp_path / "m.splat").stat().st_size == 5 * 32


def test_viewer_frame_rotates_about_x(tmp_path: Path) -> None:
    params = make_params(8, sh_degree=0)
    params["means"][0] = torch.tensor([0.0, 1.0, 2.0])
    path = tmp_path / "m.ply"
    write_ply(path, params, frame="viewer")
    rows = plyfile.PlyData.read(str(path))["vertex"].data
    stored = np.stack([rows["x"], rows["y"], rows["z"]], axis=1)
    np.testing.assert_allclose(stored[0], [0.0, -1.0, -2.0])
    np.testing.assert_allclose(stored, params["means"].numpy() * [1, -1, -1], atol=1e-6)
    q_file = torch.from_numpy(np.stack([rows[f"rot_{i}"] for i in range(4)], axis=1).astype(np.float32))
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(_quat_to_rotmat(q_file), flip @ _quat_to_rotmat(params["quats"]),
                               atol=1e-5, rtol=0)
    # Scales, opacity and DC colour do not change with the frame.
    np.testing.assert_allclose(rows["opacity"], params["opacities"].numpy(), atol=0)


def test_viewer_frame_sh_colour_follows_rotation() -> None:
    """The colour seen along d in the internal frame equals the colour along R d in the file frame."""
    params = make_params(16, sh_degree=3)
    rotated = rotate_x180(params)
    dirs = torch.nn.functional.normalize(torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    flip = torch.tensor([1.0, -1.0, -1.0])
    sh = torch.cat([params["sh0"], params["shN"]], dim=1)
    sh_rot = torch.cat([rotated["sh0"], rotated["shN"]], dim=1)
    torch.testing.assert_close(_spherical_harmonics(3, dirs * flip, sh_rot), _spherical_harmonics(3, dirs, sh),
                               atol=1e-5, rtol=1e-5)
    # And the band is not trivially unchanged: degree 1 has y and z terms that flip.
    assert not torch.allclose(rotated["shN"], params["shN"])


def test_open3d_reads_the_points(tmp_path: Path) -> None:
    o3d = pytest.importorskip("open3d", exc_type=ImportError)
    path = tmp_path / "m.ply"
    write_ply(path, make_params(50, sh_degree=3), frame="viewer")
    cloud = o3d.io.read_point_cloud(str(path))
    rows = plyfile.PlyData.read(str(path))["vertex"].data
    expected = np.stack([rows["x"], rows["y"], rows["z"]], axis=1)
    np.testing.assert_allclose(np.asarray(cloud.points), expected, atol=1e-6)


def test_reads_gsplat_exporter_output(tmp_path: Path) -> None:
    """gsplat's own PLY has no normals and only the f_rest its SH degree needs."""
    from gsplat import export_splats

    params = make_params(20, sh_degree=1)
    path = tmp_path / "gsplat.ply"
    export_splats(**params, format="ply", save_to=str(path))
    back = read_ply(path, frame="y-up")
    assert back["shN"].shape == (20, 3, 3)
    for key in ("means", "scales", "quats", "opacities", "sh0", "shN"):
        torch.testing.assert_close(back[key], params[key], msg=key)
    assert read_ply(path, frame="y-up", sh_degree=3)["shN"].shape == (20, 15, 3)
    assert read_ply(path, frame="y-up", sh_degree=0)["shN"].shape == (20, 0, 3)


def test_corrupt_files_raise_ply_error(tmp_path: Path) -> None:
    good = tmp_path / "good.ply"
    write_ply(good, make_params(8))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.ply"
    truncated.write_bytes(data[:-100])
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    garbage_body = tmp_path / "garbage_body.ply"
    garbage_body.write_bytes(b"ply\n" + np.random.default_rng(1).bytes(4096))
    empty = tmp_path / "empty.ply"
    empty.write_bytes(b"")
    cloud = tmp_path / "cloud.ply"  # a valid PLY, but a plain point cloud
    rows = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    plyfile.PlyData([plyfile.PlyElement.describe(rows, "vertex")]).write(str(cloud))
    no_vertex = tmp_path / "no_vertex.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(rows, "face")]).write(str(no_vertex))

    cases = {truncated: "truncated", garbage: "garbage", garbage_body: "garbage_body", empty: "empty",
             cloud: "missing vertex properties", no_vertex: "'vertex' element",
             tmp_path / "absent.ply": "no such file"}
    for path, what in cases.items():
        with pytest.raises(PlyError) as info:
            read_ply(path)
        assert str(path) in str(info.value), what
        assert isinstance(info.value, ValueError)
    with pytest.raises(PlyError, match="missing vertex properties"):
        read_ply(cloud)
    with pytest.raises(PlyError, match="no such file"):
        read_ply(tmp_path / "absent.ply")


def test_read_splats_leaves_out_non_finite_gaussians_and_refuses_none(tmp_path: Path, capsys) -> None:
    from plyfile import PlyData, PlyElement

    from recdreamer_gs.export import ply_rows, prepare_for_export, read_splats

    rows = ply_rows(prepare_for_export(make_params(6, sh_degree=0), "y-up"))  # raw rows: the writer drops NaNs
    rows["scale_1"][[1, 4]] = np.inf
    rows["opacity"][4] = np.nan
    path = tmp_path / "some.ply"
    PlyData([PlyElement.describe(rows, "vertex")]).write(str(path))
    assert read_splats(path, frame="y-up")["means"].shape == (4, 3)
    assert capsys.readouterr().err.strip() == (f"warning: {path}: 2 of 6 Gaussians have NaN or infinite values "
                                               "(scales: 2, opacities: 1 Gaussians); they are left out")
    rows["x"][:] = np.nan
    PlyData([PlyElement.describe(rows, "vertex")]).write(str(path))
    with pytest.raises(PlyError, match=r"all 6 Gaussians have NaN or infinite values \(means: 6, scales: 2"):
        read_splats(path)
    PlyData([PlyElement.describe(rows[:0], "vertex")]).write(str(path))
    with pytest.raises(PlyError, match="holds no Gaussians"):
        read_splats(path)
    for degree, k in ((0, 0), (1, 3), (2, 8)):  # the file pads to 45 f_rest; the zero bands are dropped
        write_ply(path, make_params(5, sh_degree=degree))
        assert read_splats(path)["shN"].shape == (5, k, 3)


def test_atomic_write_bytes(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    atomic_write_bytes(target, b"{}")
    atomic_write_bytes(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert leftovers(tmp_path, {"meta.json"}) == []
    # Honours the umask like a plain open() would (a temp file is created 0600 by mkstemp).
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing_dir" / "x.bin", b"x")


def test_write_splat_is_32_bytes_per_gaussian(tmp_path: Path) -> None:
    params = make_params(12, sh_degree=3)
    path = tmp_path / "model.splat"
    assert write_splat(path, params, frame="viewer").gaussians == 12
    data = path.read_bytes()
    assert len(data) == 12 * 32
    # Positions are the viewer-frame means (rows are Morton-sorted, so compare as sets).
    pos = np.frombuffer(data, dtype=np.uint8).reshape(12, 32)[:, :12].copy().view("<f4").reshape(12, 3)
    expected = params["means"].numpy() * [1, -1, -1]
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(order(pos), order(expected.astype(np.float32)), atol=1e-6)
    assert leftovers(tmp_path, {"model.splat"}) == []


def test_rejects_bad_inputs(tmp_path: Path) -> None:
    params = make_params(4)
    with pytest.raises(ValueError, match="frame"):
        write_ply(tmp_path / "m.ply", params, frame="z-up")  # type: ignore[arg-type]
    bad = dict(params, shN=torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match="shN"):
        write_ply(tmp_path / "m.ply", bad)
    assert not (tmp_path / "m.ply").exists()
    assert write_ply(tmp_path / "empty.ply", {k: v[:0] for k, v in params.items()}).gaussians == 0
    assert read_ply(tmp_path / "empty.ply")["means"].shape == (0, 3)
