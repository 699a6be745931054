"""``recdreamer-gs export``: a 3DGS PLY to any file of the output table (outputs.py), a mesh included."""

from __future__ import annotations

from pathlib import Path

from recdreamer_gs.devices import resolve_device
from recdreamer_gs.export import PlyFrame, check_frame, read_splats
from recdreamer_gs.mesh import export_mesh
from recdreamer_gs.outputs import FormatError, check_writable, output_for


def convert(source: str | Path, target: str | Path, frame_in: PlyFrame = "viewer", frame_out: PlyFrame = "viewer",
            mesh: bool = False, faces: int = 0, resolution: int = 0, device: str = "auto") -> str:
    """Write ``target`` (its suffix picks the writer; ``.ply`` is a mesh with ``mesh``) from the 3DGS PLY
    ``source``; returns one line saying what was written."""
    target = Path(target)
    check_frame(frame_in, "--from-frame")
    check_frame(frame_out, "--to-frame")
    suffix = target.suffix.lower() or "no suffix"
    output = output_for(target, mesh)
    if mesh and output.kind != "mesh":
        raise FormatError(f"output {target}: a mesh (--mesh) needs a .glb or .obj file name, or .ply; got {suffix}")
    if output.kind == "gaussians" and (faces or resolution):
        raise FormatError(f"output {target}: --faces and --resolution make a mesh: they need a .glb or .obj file "
                          f"name, or .ply with --mesh; got {suffix}")
    check_writable(target)
    if output.kind == "mesh":
        result = export_mesh(source, target, frame_in, frame_out, faces, resolution, resolve_device(str(device)))
        return (f"wrote {target} ({result.vertices} vertices, {result.faces} triangles from {result.views} views "
                f"in {result.seconds:.1f} s)")
    written = output.write(target, read_splats(source, frame=frame_in), frame_out)
    return f"wrote {target} ({written.details()})"
