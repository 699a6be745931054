"""The one table of output files: a format's name and suffix -> its writer (docs/outputs.md).

Everything that writes a model goes through :data:`OUTPUTS`: ``export``, the end of ``run``
(``output.formats``, ``output.mesh``), Ctrl-C and failures (``callbacks.Checkpointer``) and the live
viewer's "write now". Adding a format is one entry here plus its test.

Every Gaussian writer takes the Gaussians' parameters (``Gaussians.params`` keys, internal y-up frame),
writes them in the frame of ``model.ply`` (``export.prepare_for_export``: non-finite Gaussians left out,
viewer frame unless ``y-up``) through a temporary file that is renamed into place, and returns a
:class:`~recdreamer_gs.export.Written` that says how many Gaussians went in and how many were left out.
Mesh writers take an open3d triangle mesh in the internal frame. This module sits at the bottom of the
package: it imports only ``errors`` and ``export``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import numpy as np
from torch import Tensor

from recdreamer_gs.errors import UserError
from recdreamer_gs.export import (
    X180_AXES,
    PlyFrame,
    Written,
    atomic_path,
    atomic_write_bytes,
    ply_bytes,
    prepare_for_export,
    write_ply,
    write_splat,
    written,
)

SPZ_FRACTIONAL_BITS = 12  # positions in steps of 1/4096 (gsply's and Niantic's default)
SPZ_POSITION_LIMIT = 2.0**23 / 2**SPZ_FRACTIONAL_BITS  # 24-bit signed fixed point: |x| < 2048
# sogpy clusters the 3 colour (and 3 scale) channels of all Gaussians into 256-entry codebooks and fails
# with fewer than 256 values; its SH palette has at least 1,024 entries and fails with fewer Gaussians.
SOG_MIN_GAUSSIANS = 86
SOG_MIN_GAUSSIANS_SH = 1024


class FormatError(UserError, ValueError):
    """The Gaussians cannot be written in the format asked for (too few for it, unknown suffix)."""


# -- Gaussian writers beyond PLY and .splat ---------------------------------------------------------


def write_spz(path: str | Path, params: Mapping[str, Tensor], frame: PlyFrame = "viewer") -> Written:
    """Niantic's ``.spz`` through gsply (gzip container, version 3: every SPZ reader opens it).

    Quantisation (gsply.spz, as Niantic's load-spz.cc): positions 24-bit fixed point in steps of 1/4096,
    colour (SH DC) 8 bits of ``sh0 * 0.15 * 255 + 127.5``, opacity 8 bits of its sigmoid, log scales
    8 bits in steps of 1/16 over [-10, 6], rotations smallest-three with 9 bits, SH bands 8 bits.
    """
    import gsply  # heavy: gsply loads only when needed

    p = prepare_for_export(params, frame)
    outside = int((p["means"].abs() >= SPZ_POSITION_LIMIT).any(dim=1).sum())
    data = gsply.GSData(means=p["means"].numpy(), scales=p["scales"].numpy(), quats=p["quats"].numpy(),
                        opacities=p["opacities"].numpy(), sh0=p["sh0"].reshape(-1, 3).numpy(),
                        shN=p["shN"].numpy())
    with atomic_path(path) as tmp:
        gsply.write_spz(tmp, data, version=3, fractional_bits=SPZ_FRACTIONAL_BITS)
    note = f"{outside:,} beyond ±{SPZ_POSITION_LIMIT:g} clamped to the format's range" if outside else ""
    return written(path, params, p, note)


def write_sog(path: str | Path, params: Mapping[str, Tensor], frame: PlyFrame = "viewer") -> Written:
    """PlayCanvas's ``.sog`` (WebP textures in a zip) through sogpy, which converts a PLY.

    Quantisation (sogpy, as PlayCanvas's splat-transform): positions 16 bits per axis of
    ``sign(x) log(|x| + 1)`` over the model's range, rotations smallest-three with 8 bits, opacity 8 bits,
    colours (SH DC) and log scales as 8-bit indices into 256-entry k-means codebooks, SH bands through
    a palette. Without SH bands beyond DC the PLY handed to sogpy has no ``f_rest`` (sogpy would
    otherwise cluster 45 columns of zeros, which takes minutes).
    """
    from SogPython import convert_ply_to_sog  # heavy: SogPython loads only when needed

    p = prepare_for_export(params, frame)
    n, sh_rest = int(p["means"].shape[0]), int(p["shN"].shape[1])
    if n < SOG_MIN_GAUSSIANS:
        raise FormatError(f"{path}: SOG needs at least {SOG_MIN_GAUSSIANS} Gaussians (its 256-entry colour and "
                          f"scale codebooks), the model has {n:,} with finite values; write .ply or .spz instead")
    note = ""
    if sh_rest and n < SOG_MIN_GAUSSIANS_SH:
        sh_rest = 0
        note = f"SH bands beyond DC left out (sogpy stores them for {SOG_MIN_GAUSSIANS_SH:,} or more Gaussians)"
    with atomic_path(path) as tmp:
        source = tmp.with_name("source.ply")
        source.write_bytes(ply_bytes(p, sh_rest=sh_rest))
        state = np.random.get_state()  # sogpy draws from (and seeds) numpy's global generator
        try:
            np.random.seed(0)  # the same Gaussians give the same file
            with contextlib.redirect_stdout(io.StringIO()):  # sogpy prints its progress
                convert_ply_to_sog(str(source), str(tmp))
        finally:
            np.random.set_state(state)
        source.unlink()
    return written(path, params, p, note)


# -- mesh writers ------------------------------------------------------------------------------------


def to_frame(mesh, frame: PlyFrame):
    """A copy of ``mesh`` (internal y-up) in the file's frame: ``viewer`` rotates 180° about x."""
    out = copy.deepcopy(mesh)
    if frame == "viewer":
        out.rotate(np.diag(X180_AXES), center=np.zeros(3))  # a rotation: winding and normals stay valid
    elif frame != "y-up":
        raise ValueError(f"frame must be 'viewer' or 'y-up', got {frame!r}")
    return out


def _matte_material(tree: dict) -> None:
    """glTF's default material is fully metallic (dark under most lights): give the primitives a matte
    white one, which the vertex colours (COLOR_0) multiply."""
    tree.setdefault("materials", []).append(
        {"name": "vertex colours", "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                                            "metallicFactor": 0.0, "roughnessFactor": 1.0}})
    for mesh in tree.get("meshes", []):
        for primitive in mesh["primitives"]:
            primitive["material"] = len(tree["materials"]) - 1


def glb_bytes(mesh) -> bytes:
    """A binary glTF 2.0 of an open3d mesh (positions, unit normals, RGBA8 vertex colours, uint32 indices).

    trimesh writes it: open3d's own GLB writer puts the buffer in a data URI inside the container and
    declares a wrong index maximum, which strict importers and the Khronos validator reject.
    """
    import trimesh  # heavy: trimesh loads only when needed
    from trimesh.exchange.gltf import export_glb

    colours = np.asarray(mesh.vertex_colors) if mesh.has_vertex_colors() else np.full((len(mesh.vertices), 3), 0.7)
    if not mesh.has_vertex_normals():
        mesh.compute_vertex_normals()
    rgba = np.concatenate([np.round(np.clip(colours, 0, 1) * 255), np.full((len(colours), 1), 255)], axis=1)
    tm = trimesh.Trimesh(vertices=np.asarray(mesh.vertices), faces=np.asarray(mesh.triangles),
                         vertex_normals=np.asarray(mesh.vertex_normals), vertex_colors=rgba.astype(np.uint8),
                         process=False)
    return export_glb(tm, include_normals=True, tree_postprocessor=_matte_material)


def write_glb(path: str | Path, mesh, frame: PlyFrame = "viewer") -> None:
    """Binary glTF 2.0 with vertex colours and normals, atomically."""
    atomic_write_bytes(path, glb_bytes(to_frame(mesh, frame)))


def write_open3d_mesh(path: str | Path, mesh, frame: PlyFrame = "viewer") -> None:
    """``.obj`` or binary ``.ply`` (open3d picks by suffix) with vertex colours and normals, atomically."""
    import open3d as o3d  # heavy: open3d loads only when needed

    out = to_frame(mesh, frame)
    with atomic_path(path) as tmp, o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        # OBJ: "v x y z r g b" lines (the common vertex-colour extension), no material file.
        ok = o3d.io.write_triangle_mesh(str(tmp), out, write_ascii=False, compressed=False,
                                        write_vertex_normals=True, write_vertex_colors=True,
                                        write_triangle_uvs=False, print_progress=False)
        if not ok or not tmp.is_file():
            raise OSError(f"cannot write {path}: open3d could not write the mesh")


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One kind of output file."""

    name: str  # what output.formats (Gaussians) or output.mesh (meshes) call it
    suffix: str  # the file name's ending
    kind: Literal["gaussians", "mesh"]  # what the writer takes: Gaussian parameters or an open3d mesh
    write: Callable[[Path, Any, PlyFrame], Optional[Written]]  # (path, params or mesh, frame)
    readers: str  # who opens it (README, docs/outputs.md)


OUTPUTS: tuple[Output, ...] = (
    Output("ply", ".ply", "gaussians", write_ply, "every 3DGS viewer and tool: SuperSplat, PlayCanvas, Spark, "
           "antimatter15/splat, gsplat.js, Unity and Blender add-ons (248 bytes per Gaussian)"),
    Output("splat", ".splat", "gaussians", write_splat, "antimatter15/splat, gsplat.js, Spark, SuperSplat "
           "(32 bytes per Gaussian, colour without SH bands)"),
    Output("spz", ".spz", "gaussians", write_spz, "Spark, Niantic Scaniverse and its spz tools "
           "(about 17-18 bytes per Gaussian)"),
    Output("sog", ".sog", "gaussians", write_sog, "SuperSplat, the PlayCanvas engine and splat-transform "
           "(about 15-20 bytes per Gaussian)"),
    Output("glb", ".glb", "mesh", write_glb, "glTF viewers: Blender, three.js, Windows 3D Viewer"),
    Output("obj", ".obj", "mesh", write_open3d_mesh, "Blender, MeshLab (vertex colours as v x y z r g b)"),
    Output("ply", ".ply", "mesh", write_open3d_mesh, "MeshLab, Blender, CloudCompare"),
)


def names(kind: Literal["gaussians", "mesh"] = "gaussians") -> list[str]:
    """The names of one kind of output, in table order."""
    return [o.name for o in OUTPUTS if o.kind == kind]


def output_named(name: str, kind: Literal["gaussians", "mesh"] = "gaussians") -> Output:
    """The table entry called ``name`` (``output.formats`` / ``output.mesh``)."""
    for o in OUTPUTS:
        if o.kind == kind and o.name == name:
            return o
    raise FormatError(f"unknown {kind} format {name!r}; expected one of {', '.join(names(kind))}")


def output_for(path: str | Path, mesh: bool = False) -> Output:
    """The entry that writes ``path``: by suffix; ``.ply`` is the Gaussian PLY unless ``mesh``.
    Mesh-only suffixes (.glb, .obj) pick the mesh writer whatever ``mesh`` says."""
    suffix = Path(path).suffix.lower()
    found = [o for o in OUTPUTS if o.suffix == suffix]
    if not found:
        every = sorted({o.suffix for o in OUTPUTS})
        raise FormatError(f"output {path}: expected a file name ending in {', '.join(every)}, "
                          f"got {suffix or 'no suffix'}")
    return next((o for o in found if o.kind == ("mesh" if mesh else "gaussians")), found[0])


def write_mesh(path: str | Path, mesh, frame: PlyFrame = "viewer") -> None:
    """Write a mesh file by its suffix (.glb, .obj or .ply), atomically."""
    output = output_for(path, mesh=True)
    if output.kind != "mesh":
        raise FormatError(f"{path}: expected a mesh file name ending in "
                          f"{', '.join(o.suffix for o in OUTPUTS if o.kind == 'mesh')}, got {Path(path).suffix}")
    output.write(Path(path), mesh, frame)


def check_writable(path: Path) -> None:
    """Fail before a slow conversion (a mesh, a SOG) when ``path`` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FormatError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FormatError(f"cannot write {path}: no permission to write in {folder}")
    if path.is_dir():
        raise FormatError(f"cannot write {path}: it is a folder")
