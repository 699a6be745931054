"""Standard 3DGS ``.ply`` / antimatter15 ``.splat`` writers, the PLY reader and atomic file writes.

The bottom of the package's file handling (it imports only ``errors``): ``outputs.py`` builds the table of
every output format on it, and the ``export`` command (``convert.py``) sits above both.

The PLY is the INRIA 3DGS layout (README, "What a run makes"): ``binary_little_endian``, one ``vertex``
element of 62 float32 properties (248 bytes per Gaussian), normals zero, ``f_rest`` channel-major
and zero-padded to 45, no header comments. Stored values are the raw parameters (log scales,
opacity logits, SH coefficients), which is what viewers expect.

Frames (docs/frames.md): internally +y is up. ``frame="viewer"`` writes world (x, y, z) as
(x, -y, -z), a 180° rotation about x, which is the COLMAP/OpenCV y-down frame splat viewers
assume; quaternions and SH bands are rotated with it. ``frame="y-up"`` writes the internal frame.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Iterator, Literal, Mapping, Optional

import numpy as np
import torch
from jaxtyping import Bool, Float
from plyfile import PlyData, PlyElement
from torch import Tensor

from recdreamer_gs.errors import UserError, warn

PlyFrame = Literal["viewer", "y-up"]

LOG_SCALE_CLAMP = 20.0  # |log scale| limit on export: exp(±20) covers any sane scene, viewers break on inf
MAX_SH_REST = 15  # SH degree 3: (3+1)^2 - 1 coefficients beyond DC, the most the INRIA layout holds
PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")



def ply_properties(sh_rest: int = MAX_SH_REST) -> tuple[str, ...]:
    """The INRIA property order (graphdeco-inria/gaussian-splatting, GaussianModel.save_ply) with ``sh_rest``
    SH coefficients per channel beyond DC."""
    return (("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2")
            + tuple(f"f_rest_{i}" for i in range(3 * sh_rest))
            + ("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"))


PLY_PROPERTIES = ply_properties()  # 62 x float32 = 248 bytes per Gaussian
_REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")

# Unit quaternion (w, x, y, z) of the 180° rotation about x that maps y-up to the viewer frame,
# and what it does to the axes: (x, y, z) -> (x, -y, -z).
_Q_X180 = (0.0, 1.0, 0.0, 0.0)
X180_AXES = (1.0, -1.0, -1.0)


class PlyError(UserError, ValueError):
    """A PLY file is missing, unreadable or lacks the 3DGS properties."""


@dataclass(frozen=True)
class Written:
    """What a Gaussian writer put into one file."""

    path: Path
    gaussians: int  # rows written
    dropped: int = 0  # Gaussians left out because a parameter was NaN or infinite
    note: str = ""  # anything else the format changed, in words (e.g. SH bands it could not hold)

    def details(self) -> str:
        """E.g. ``1,024 Gaussians; 3 with non-finite values left out``."""
        extra = [f"{self.dropped:,} with non-finite values left out"] if self.dropped else []
        extra += [self.note] if self.note else []
        return "; ".join([f"{self.gaussians:,} Gaussians", *extra])

    def describe(self) -> str:
        """E.g. ``model.spz (1,024 Gaussians; 3 with non-finite values left out)``."""
        return f"{self.path.name} ({self.details()})"


# -- atomic writes ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path with ``path``'s name (for writers that pick the format from it or print the name),
    in a fresh hidden folder next to ``path``; on success it is renamed onto ``path``.

    Same folder, same file system: ``os.replace`` is an atomic rename. On any error the temp folder
    is removed and an existing ``path`` is left untouched; an ``OSError`` is raised again with
    ``path`` as its file name (not the temp name), so that messages name the file the user knows.
    """
    path = Path(path)
    folder = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        folder.mkdir()
        tmp = folder / path.name
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # the subclass follows errno
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # whatever a failed writer left there


@contextlib.contextmanager
def _atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """Binary file object on a temp file next to ``path``; renamed onto ``path`` on success."""
    with atomic_path(path) as tmp:
        # os.open with 0o666 honours the umask (mkstemp would leave the final file 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace`` (readers never see half a file)."""
    with _atomic_open(path) as f:
        f.write(data)


# -- frame conversion (pure) ------------------------------------------------------------------


def quat_multiply(a: Float[Tensor, "*B 4"], b: Float[Tensor, "*B 4"]) -> Float[Tensor, "*B 4"]:
    """Hamilton product a ⊗ b of wxyz quaternions (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


@lru_cache(maxsize=None)
def _sh_x180_signs_cached() -> Tensor:
    from gsplat.cuda._torch_impl import _eval_sh_bases_fast  # heavy: gsplat loads only when needed

    # Under d -> (x, -y, -z) each real SH basis function of gsplat's convention is mapped to ±
    # itself; read the sign off the basis itself at random directions instead of a hand table.
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(256, 3, generator=gen, dtype=torch.float64), dim=-1)
    flipped = dirs * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    num_bases = MAX_SH_REST + 1
    a = _eval_sh_bases_fast(num_bases, dirs)[:, 1:]
    b = _eval_sh_bases_fast(num_bases, flipped)[:, 1:]
    ratio = b / a
    signs = torch.sign(ratio.median(dim=0).values)
    if not torch.allclose(ratio, signs.expand_as(ratio), atol=1e-6):
        raise RuntimeError("gsplat SH basis is not sign-symmetric under the x-axis 180° rotation")
    return signs.float()


def sh_x180_signs(num_rest: int) -> Float[Tensor, "K"]:
    """Per-coefficient sign of the SH bands beyond DC under the 180° rotation about x."""
    if not 0 <= num_rest <= MAX_SH_REST:
        raise ValueError(f"expected 0..{MAX_SH_REST} SH coefficients beyond DC, got {num_rest}")
    return _sh_x180_signs_cached()[:num_rest].clone()


def rotate_x180(params: Mapping[str, Tensor], inverse: bool = False) -> dict[str, Tensor]:
    """Rotate Gaussians 180° about x: means (x,-y,-z), quats q_x180 ⊗ q, SH bands sign-flipped.

    The rotation is its own inverse for means and SH; ``inverse=True`` left-multiplies by the
    conjugate quaternion so that a round trip returns the exact quaternion, not its negative.
    """
    means = params["means"]
    q = params["quats"]
    q_rot = torch.tensor(_Q_X180, dtype=q.dtype, device=q.device)
    if inverse:
        q_rot = q_rot * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype, device=q.device)
    shN = params["shN"]
    out = dict(params)
    out["means"] = means * torch.tensor(X180_AXES, dtype=means.dtype, device=means.device)
    out["quats"] = quat_multiply(q_rot.expand_as(q), q)
    # A colour field f(d) = Σ c_k Y_k(d) seen in the rotated frame is f(R d') = Σ c_k s_k Y_k(d').
    out["shN"] = shN * sh_x180_signs(shN.shape[1]).to(shN).reshape(1, -1, 1)
    return out


def check_frame(frame: str, name: str = "frame") -> None:
    """``frame`` (the option ``name``) is one of the two PLY frames."""
    if frame not in ("viewer", "y-up"):
        raise PlyError(f"{name}: expected viewer or y-up, got {frame!r}")


def prepare_for_export(params: Mapping[str, Tensor], frame: PlyFrame = "viewer") -> dict[str, Tensor]:
    """Detached float32 CPU copies in the file's frame, non-finite rows dropped, log scales clamped,
    quaternions normalised (a zero quaternion becomes identity, as gsplat renders it)."""
    check_frame(frame)
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params must have keys {list(PARAM_KEYS)}, missing {missing}")
    p = {k: params[k].detach().to("cpu", torch.float32) for k in PARAM_KEYS}
    n = p["means"].shape[0]
    expected = {"means": (n, 3), "scales": (n, 3), "quats": (n, 4), "opacities": (n,), "sh0": (n, 1, 3)}
    for k, shape in expected.items():
        if tuple(p[k].shape) != shape:
            raise ValueError(f"params[{k!r}] should have shape {list(shape)}, got {list(p[k].shape)}")
    sh_n = p["shN"]
    if sh_n.ndim != 3 or sh_n.shape[0] != n or sh_n.shape[2] != 3 or sh_n.shape[1] not in (0, 3, 8, 15):
        raise ValueError(f"params['shN'] should have shape [{n}, K, 3] with K in 0/3/8/15, got {list(sh_n.shape)}")

    keep = finite_rows(p)
    p = {k: v[keep] for k, v in p.items()}
    p["scales"] = p["scales"].clamp(-LOG_SCALE_CLAMP, LOG_SCALE_CLAMP)
    norm = p["quats"].norm(dim=-1, keepdim=True)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand_as(p["quats"])
    p["quats"] = torch.where(norm > 0, p["quats"] / norm.clamp_min(1e-30), identity)
    if frame == "viewer":
        p = rotate_x180(p)
    return p


def finite_rows(params: Mapping[str, Tensor]) -> Bool[Tensor, "N"]:
    """True for the Gaussians whose every parameter is finite (per row, unlike gsplat 1.5.3's opacity check)."""
    keep = torch.ones(params["means"].shape[0], dtype=torch.bool)
    for v in params.values():
        keep &= torch.isfinite(v.flatten(1) if v.ndim > 1 else v[:, None]).all(dim=1)
    return keep


# -- writers ----------------------------------------------------------------------------------


def ply_rows(p: Mapping[str, Tensor], sh_rest: int = MAX_SH_REST) -> np.ndarray:
    """Structured array in the INRIA layout from prepared params (see ``prepare_for_export``), with
    ``sh_rest`` coefficients per channel beyond DC (zero-padded)."""
    n = p["means"].shape[0]
    sh_n = p["shN"][:, :sh_rest]
    padded = torch.zeros(n, sh_rest, 3)
    padded[:, : sh_n.shape[1]] = sh_n
    f_rest = padded.permute(0, 2, 1).reshape(n, 3 * sh_rest)  # channel-major: index c*K + k
    flat = torch.cat([
        p["means"], torch.zeros(n, 3), p["sh0"].reshape(n, 3), f_rest,
        p["opacities"].reshape(n, 1), p["scales"], p["quats"],
    ], dim=1)
    data = np.ascontiguousarray(flat.numpy().astype("<f4"))
    dtype = np.dtype([(name, "<f4") for name in ply_properties(sh_rest)])
    return data.view(dtype).reshape(n)


def ply_bytes(p: Mapping[str, Tensor], sh_rest: int = MAX_SH_REST) -> bytes:
    """The 3DGS PLY of prepared params (see ``prepare_for_export``) with ``sh_rest`` SH coefficients
    per channel beyond DC (the INRIA layout's 15, zero-padded; or only those the Gaussians have)."""
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(ply_rows(p, sh_rest), "vertex")], text=False, byte_order="<").write(buffer)
    return buffer.getvalue()


def write_ply(path: str | Path, params: Mapping[str, Tensor], frame: PlyFrame = "viewer") -> Written:
    """Write the standard 3DGS PLY atomically (non-finite Gaussians left out)."""
    p = prepare_for_export(params, frame)
    atomic_write_bytes(path, ply_bytes(p))
    return written(path, params, p)


def write_splat(path: str | Path, params: Mapping[str, Tensor], frame: PlyFrame = "viewer") -> Written:
    """Write the antimatter15 ``.splat`` (32 bytes per Gaussian) atomically (non-finite Gaussians left out)."""
    from gsplat import export_splats  # heavy: gsplat loads only when needed

    p = prepare_for_export(params, frame)
    data = export_splats(p["means"], p["scales"], p["quats"], p["opacities"], p["sh0"], p["shN"],
                         format="splat")
    atomic_write_bytes(path, data)
    return written(path, params, p)


def written(path: str | Path, params: Mapping[str, Tensor], prepared: Mapping[str, Tensor], note: str = "") -> Written:
    """The ``Written`` of a file made from ``prepared = prepare_for_export(params)``."""
    n = int(prepared["means"].shape[0])
    return Written(Path(path), n, int(params["means"].shape[0]) - n, note)


def write_point_cloud(path: str | Path, points: Float[Tensor, "N 3"], rgb: Optional[Float[Tensor, "N 3"]] = None,
                      frame: PlyFrame = "viewer") -> int:
    """A plain coloured point cloud PLY (float x y z, uchar red green blue: what point-cloud viewers read),
    in the frame of the run's splat PLY so that the two overlay; written atomically. Returns the points."""
    check_frame(frame)
    xyz = points.detach().to("cpu", torch.float32)
    if frame == "viewer":
        xyz = xyz * torch.tensor([1.0, -1.0, -1.0])  # world (x, y, z) -> (x, -y, -z), as write_ply
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rows = np.empty(xyz.shape[0], dtype=fields)
    for i, axis in enumerate("xyz"):
        rows[axis] = xyz[:, i].numpy()
    if rgb is not None:
        colours = (rgb.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for i, channel in enumerate(("red", "green", "blue")):
            rows[channel] = colours[:, i]
    ply = PlyData([PlyElement.describe(rows, "vertex")], text=False, byte_order="<")
    with _atomic_open(path) as f:
        ply.write(f)
    return int(rows.shape[0])


# -- reader -----------------------------------------------------------------------------------


def read_ply(path: str | Path, frame: PlyFrame = "viewer", sh_degree: Optional[int] = None) -> dict[str, Tensor]:
    """Read a 3DGS PLY into ``Gaussians.params`` keys (internal y-up frame).

    Accepts the INRIA layout and variants without normals or with fewer ``f_rest`` (gsplat's own
    exporter). ``shN`` holds the coefficients the file has (15 for 45 ``f_rest``); ``sh_degree``
    trims it to (d+1)^2-1 coefficients, or zero-pads when the file holds fewer.
    """
    check_frame(frame)
    path = Path(path)
    if not path.exists():
        raise PlyError(f"{path}: no such file")
    if not path.is_file():
        raise PlyError(f"{path}: not a regular file")
    try:
        # mmap=True is plyfile's fast path (np.memmap); its mmap=False path parses row by row.
        ply = PlyData.read(str(path), mmap=True)
        vertex = ply["vertex"]
        data = vertex.data
    except KeyError:
        raise PlyError(f"{path}: expected a 'vertex' element, the file has none") from None
    except UnicodeDecodeError:
        raise PlyError(f"{path}: not a PLY file (the header is not ASCII text)") from None
    except Exception as e:  # plyfile raises several types (parse errors, numpy errors) on bad data
        raise PlyError(f"{path}: not a readable PLY file ({type(e).__name__}: {e})") from None
    names = set(data.dtype.names or ())
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        raise PlyError(f"{path}: not a 3DGS PLY, missing vertex properties {missing}")
    num_rest = sum(1 for name in names if name.startswith("f_rest_"))
    if num_rest % 3 or num_rest // 3 > MAX_SH_REST or any(f"f_rest_{i}" not in names for i in range(num_rest)):
        raise PlyError(f"{path}: expected f_rest_0..f_rest_(3K-1) with K in 0/3/8/15, got {num_rest} f_rest properties")
    k = num_rest // 3
    if k not in (0, 3, 8, 15):
        raise PlyError(f"{path}: {num_rest} f_rest properties is not a full SH degree (expected 0, 9, 24 or 45)")

    def cols(*props: str) -> Tensor:
        return torch.from_numpy(np.stack([np.asarray(data[name], dtype=np.float32) for name in props], axis=1))

    n = len(data)
    p = {
        "means": cols("x", "y", "z"),
        "scales": cols("scale_0", "scale_1", "scale_2"),
        "quats": cols("rot_0", "rot_1", "rot_2", "rot_3"),
        "opacities": cols("opacity").reshape(n),
        "sh0": cols("f_dc_0", "f_dc_1", "f_dc_2").reshape(n, 1, 3),
        "shN": (cols(*(f"f_rest_{i}" for i in range(num_rest))).reshape(n, 3, k).permute(0, 2, 1).contiguous()
                if k else torch.zeros(n, 0, 3)),
    }
    if sh_degree is not None:
        want = (sh_degree + 1) ** 2 - 1
        if not 0 <= want <= MAX_SH_REST:
            raise ValueError(f"sh_degree must be 0..3, got {sh_degree}")
        sh_n = torch.zeros(n, want, 3)
        sh_n[:, : min(want, k)] = p["shN"][:, :want]
        p["shN"] = sh_n
    if frame == "viewer":
        p = rotate_x180(p, inverse=True)
    return p


def is_splat_ply(path: str | Path) -> bool:
    """Whether a ``.ply`` holds 3DGS Gaussians: its header names their properties (read from the header only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return False
    header = head.split(b"end_header", 1)[0].decode("ascii", "replace").split()
    return head.startswith(b"ply") and all(name in header for name in _REQUIRED)


def non_finite_summary(params: Mapping[str, Tensor]) -> str:
    """Which parameters are NaN or infinite and in how many Gaussians, e.g. ``scales: 3, opacities: 1``."""
    parts = []
    for key, v in params.items():
        bad = ~torch.isfinite(v.flatten(1) if v.ndim > 1 else v[:, None]).all(dim=1)
        if bool(bad.any()):
            parts.append(f"{key}: {int(bad.sum()):,}")
    return ", ".join(parts)


def trim_sh(sh_n: Float[Tensor, "N K 3"]) -> Float[Tensor, "N L 3"]:
    """The SH coefficients up to the highest degree that has a non-zero one (the INRIA layout pads every
    file to degree 3: a model of degree 0 reads back as 15 zero coefficients)."""
    for k, lower in ((15, 8), (8, 3), (3, 0)):
        if sh_n.shape[1] == k and not sh_n[:, lower:].any():
            sh_n = sh_n[:, :lower]
    return sh_n


def read_splats(path: str | Path, frame: PlyFrame = "viewer") -> dict[str, Tensor]:
    """``read_ply`` for the commands that use the Gaussians (render, view, eval, export, --init-from): SH bands
    that are all zero are dropped (``trim_sh``); Gaussians with a NaN or infinite parameter are left out with
    a warning that says which; a file with none left is an error."""
    params = read_ply(path, frame=frame)
    params["shN"] = trim_sh(params["shN"])
    n = int(params["means"].shape[0])
    if n == 0:
        raise PlyError(f"{path}: the file holds no Gaussians (its vertex element is empty)")
    keep = finite_rows(params)
    kept = int(keep.sum())
    if kept == n:
        return params
    what = f"NaN or infinite values ({non_finite_summary(params)} Gaussians)"
    if kept == 0:
        raise PlyError(f"{path}: all {n:,} Gaussians have {what}; the file holds nothing to show or convert "
                       "(was it written by a run that diverged?)")
    warn(f"{path}: {n - kept:,} of {n:,} Gaussians have {what}; they are left out")
    return {k: v[keep] for k, v in params.items()}
