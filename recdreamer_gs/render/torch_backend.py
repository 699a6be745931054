"""Pure-PyTorch compositor for CPU: the same maths as gsplat's CUDA rasterizer, tiled and sparse.

Projection reuses gsplat's own PyTorch reference (``gsplat.cuda._torch_impl``, pinned 1.5.3),
which runs on CPU. Constants follow gsplat (docs/rendering.md): eps2d dilation,
alpha = min(0.999, o·exp(-σ)), fragments with alpha < 1/255 skipped, a pixel stops before its
transmittance would fall to 1e-4, pixel centres at +0.5, SH colour +0.5 clamped at 0.

Speed: instead of every pixel against every Gaussian, the image is cut into small tiles (2-8 px,
picked from the footprint size) and each Gaussian is paired only with the tiles that its footprint
box overlaps (gsplat's opacity-aware box: outside it alpha < 1/255, so nothing is dropped). The
(tile, Gaussian) pairs of all cameras sit in one flat list sorted by (tile, depth); transmittance is
a segmented cumsum of log(1 - alpha), and compositing has a hand-written backward (gsplat's
gradient, vectorised) so that autograd stores no dozen [pairs, pixels] intermediates.
"""

from __future__ import annotations

import math

import torch
from gsplat.cuda._torch_impl import _persp_proj, _quat_scale_to_covar_preci, _spherical_harmonics, _world_to_cam
from jaxtyping import Float, Int
from torch import Tensor

from recdreamer_gs.render.inputs import Splats, Views

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
LOG_T_MIN = math.log(T_MIN)
MAX_EXTEND = 3.33  # footprint box in standard deviations (gsplat's cap)


def project(
    splats: Splats, views: Views, eps2d: float = 0.3, near_plane: float = 0.01, far_plane: float = 1e10,
) -> tuple[Int[Tensor, "C N 2"], Float[Tensor, "C N 2"], Float[Tensor, "C N"], Float[Tensor, "C N 3"]]:
    """EWA projection as gsplat's fused CUDA kernel: radii (0 = culled), means2d, depths, conics.

    The radius per axis is ``ceil(min(3.33, sqrt(2 ln(255 o))) · sqrt(Σ2d_ii))``: beyond it alpha < 1/255
    whatever the other axis, so no fragment outside the box can be drawn.
    """
    width, height, opacities = views.width, views.height, splats.opacities
    covars, _ = _quat_scale_to_covar_preci(splats.quats, splats.scales, compute_covar=True, compute_preci=False,
                                           triu=False)
    means_c, covars_c = _world_to_cam(splats.means, covars, views.viewmats)
    means2d, covars2d = _persp_proj(means_c, covars_c, views.Ks, width, height)
    depths = means_c[..., 2]
    sxx = covars2d[..., 0, 0] + eps2d
    syy = covars2d[..., 1, 1] + eps2d
    sxy = 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0])
    det = sxx * syy - sxy * sxy
    det_safe = det.clamp_min(1e-10)
    conics = torch.stack([syy / det_safe, -sxy / det_safe, sxx / det_safe], dim=-1)

    with torch.no_grad():
        o = opacities.detach()[None].expand_as(depths)
        extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(MAX_EXTEND)
        radius = torch.stack([torch.ceil(extend * sxx.sqrt()), torch.ceil(extend * syy.sqrt())], dim=-1)
        m2d = means2d.detach()
        valid = (
            (det > 0)
            & (depths > near_plane)
            & (depths < far_plane)
            & (o >= ALPHA_MIN)  # gsplat culls these at projection: they get no gradient
            & (radius > 0).any(dim=-1)
            & (m2d[..., 0] + radius[..., 0] > 0)
            & (m2d[..., 0] - radius[..., 0] < width)
            & (m2d[..., 1] + radius[..., 1] > 0)
            & (m2d[..., 1] - radius[..., 1] < height)
        )
        radii = torch.where(valid[..., None], radius, torch.zeros_like(radius)).to(torch.int32)
    return radii, means2d, depths, conics


def choose_tile(radii: Int[Tensor, "C N 2"]) -> int:
    """Tile side for the compositor: the work is pairs·(tile² + overhead), and a footprint of radius r
    makes (2r + tile)²/tile² pairs; on 2-core CPUs 2 px tiles won for r ≈ 7 px, 4 px for r ≈ 13 px."""
    visible = (radii > 0).all(dim=-1)
    if not bool(visible.any()):
        return 2
    r = radii[visible].float().mean().item()
    return 2 if r <= 9.0 else 4 if r <= 24.0 else 8


def _tile_pairs(
    means2d: Float[Tensor, "C N 2"], radii: Int[Tensor, "C N 2"], depths: Float[Tensor, "C N"],
    width: int, height: int, tile: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
    """All (tile, Gaussian) overlaps of all cameras, sorted by (camera, tile, depth).

    Returns the flat Gaussian index (c·N + n) and global tile index of every pair, the pixel origin
    (x0, y0) of its tile, and the tile grid size (tiles_x, tiles_y).
    """
    C, N = depths.shape
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    device = means2d.device
    with torch.no_grad():
        flat = torch.nonzero((radii > 0).all(dim=-1).reshape(-1), as_tuple=False).squeeze(-1)
        m = means2d.detach().reshape(-1, 2)[flat]
        r = radii.reshape(-1, 2)[flat].to(m.dtype)
        # Pixels whose centre j + 0.5 lies within [m - r, m + r]; the tiles holding them.
        lo = torch.ceil(m - r - 0.5).clamp_min(0)
        hi = torch.floor(m + r - 0.5)
        hi = torch.minimum(hi, torch.tensor([width - 1, height - 1], dtype=m.dtype, device=device))
        t_lo = torch.div(lo, tile, rounding_mode="floor").long()
        t_hi = torch.div(hi, tile, rounding_mode="floor").long()
        n_xy = (t_hi - t_lo + 1).clamp_min(0)
        counts = n_xy[:, 0] * n_xy[:, 1]
        owner = torch.repeat_interleave(torch.arange(flat.numel(), device=device), counts)
        local = torch.arange(owner.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[owner]
        nx = n_xy[owner, 0]
        tx = t_lo[owner, 0] + local % nx
        ty = t_lo[owner, 1] + torch.div(local, nx, rounding_mode="floor")
        gid = flat[owner]
        cam = torch.div(gid, N, rounding_mode="floor")
        tile_id = (cam * tiles_y + ty) * tiles_x + tx
        # Depth rank within each camera; one sort on (tile, rank) gives front-to-back per tile.
        rank = torch.empty_like(depths, dtype=torch.long)
        order = torch.argsort(depths.detach(), dim=1)
        rank.scatter_(1, order, torch.arange(N, device=device).expand(C, N).contiguous())
        key = tile_id * N + rank.reshape(-1)[gid]
        perm = torch.argsort(key)
        gid, tile_id, tx, ty = gid[perm], tile_id[perm], tx[perm], ty[perm]
    return gid, tile_id, tx * tile, ty * tile, tiles_x, tiles_y


def _segments(tile_id: Int[Tensor, "I"]) -> tuple[Tensor, Tensor]:
    """Index of the first and of the last pair of each pair's tile (pairs are grouped by tile)."""
    _, counts = torch.unique_consecutive(tile_id, return_counts=True)
    ends = torch.cumsum(counts, 0)
    first = torch.repeat_interleave(ends - counts, counts)
    last = torch.repeat_interleave(ends - 1, counts)
    return first, last


def _local_moments(tile: int, dtype: torch.dtype, device: torch.device) -> Float[Tensor, "S 6"]:
    """Columns 1, lx, ly, lx², lx·ly, ly² of the tile's pixel centres (row-major, relative to its corner)."""
    local = torch.arange(tile, dtype=dtype, device=device) + 0.5
    ly, lx = torch.meshgrid(local, local, indexing="ij")
    lx, ly = lx.reshape(-1), ly.reshape(-1)
    return torch.stack([torch.ones_like(lx), lx, ly, lx * lx, lx * ly, ly * ly], dim=-1)


def _with_ones(f: Tensor) -> Tensor:
    """Append a channel of ones: its composite is the accumulated alpha Σ w."""
    return torch.cat([f, torch.ones_like(f[:, :1])], dim=-1)


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing of sorted (tile, Gaussian) pairs; gsplat's forward and backward.

    Output ``[n_tiles, tile², F + 1]``: Σ w·feature for each feature channel, then Σ w (the alpha).
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, gid, tile_id, x0, y0, n_tiles, tile):
        I, S = gid.shape[0], tile * tile
        F = features.shape[-1]
        out = features.new_zeros(n_tiles, S, F + 1)
        ctx.tile, ctx.empty = tile, I == 0
        if I == 0:
            ctx.save_for_backward(means2d, conics, opacities, features)
            return out
        first, last = _segments(tile_id)
        alpha, t_keep = _Composite._alpha_transmittance(means2d, conics, opacities, gid, x0, y0, tile, first)
        w = alpha * t_keep
        f = _with_ones(features.index_select(0, gid))  # [I, F + 1]
        out.index_add_(0, tile_id, w[:, :, None] * f[:, None, :])
        ctx.save_for_backward(means2d, conics, opacities, features, gid, tile_id, x0, y0, alpha, t_keep, last)
        return out

    @staticmethod
    def _offsets(means2d, gid, x0, y0, tile):
        """Pixel-centre offsets from each pair's mean: dx [I, 1, tile] (columns), dy [I, tile, 1] (rows)."""
        dtype = means2d.dtype
        local = torch.arange(tile, dtype=dtype, device=means2d.device) + 0.5
        m = means2d.index_select(0, gid)
        dx = (x0.to(dtype) - m[:, 0])[:, None] + local[None, :]
        dy = (y0.to(dtype) - m[:, 1])[:, None] + local[None, :]
        return dx[:, None, :], dy[:, :, None]

    @staticmethod
    def _alpha_transmittance(means2d, conics, opacities, gid, x0, y0, tile, first):
        """Per pair and tile pixel [I, tile²] (row-major): alpha (0 where skipped) and T·keep."""
        dx, dy = _Composite._offsets(means2d, gid, x0, y0, tile)
        a, b, c = conics.index_select(0, gid)[:, :, None, None].unbind(1)
        # σ = ½(a dx² + c dy²) + b dx dy, built from the separable row and column terms.
        sigma = ((0.5 * a) * dx * dx + (0.5 * c) * dy * dy) + (b * dx) * dy
        sigma = sigma.reshape(gid.shape[0], tile * tile)
        alpha = (opacities.index_select(0, gid)[:, None] * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
        # Segmented cumsum of log(1 - alpha) in float64: a global cumsum minus its value before each
        # tile's first pair (float32 would lose digits once the running sum spans many tiles).
        log1m = torch.log1p(-alpha).double()
        cs = torch.cumsum(log1m, dim=0)
        log_t_next = cs - (cs - log1m).index_select(0, first)
        # gsplat stops a pixel before a Gaussian that would take T to 1e-4 or below; T only falls
        # along a pixel's list, so the first such Gaussian and all after it are dropped.
        t_keep = torch.where(log_t_next > LOG_T_MIN, torch.exp(log_t_next - log1m), 0.0).to(alpha.dtype)
        return alpha, t_keep

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.empty:
            means2d, conics, opacities, features = ctx.saved_tensors
            return (torch.zeros_like(means2d), torch.zeros_like(conics), torch.zeros_like(opacities),
                    torch.zeros_like(features)) + (None,) * 6
        means2d, conics, opacities, features, gid, tile_id, x0, y0, alpha, t_keep, last = ctx.saved_tensors
        tile = ctx.tile
        f = _with_ones(features.index_select(0, gid))  # [I, F + 1]
        g = grad_out.contiguous().index_select(0, tile_id)  # [I, S, F + 1]
        w = alpha * t_keep
        grad_f = torch.bmm(w[:, None, :], g).squeeze(1)  # [I, F + 1]
        s = torch.bmm(g, f[:, :, None]).squeeze(-1)  # dL/dw per pair pixel [I, S]
        # dL/dα_i = k_i T_i s_i − Σ_{j>i} s_j w_j / (1 − α_i): every later weight carries (1 − α_i).
        cs = torch.cumsum((s * w).double(), dim=0)
        later = (cs.index_select(0, last) - cs).to(alpha.dtype)
        v_alpha = t_keep * s - later / (1.0 - alpha)
        # alpha = o·exp(−σ) where drawn and not clamped at 0.999; elsewhere it is constant.
        live = (alpha > 0) & (alpha < ALPHA_MAX)
        va = torch.where(live, v_alpha * alpha, 0.0)  # = o·∂L/∂o per pixel = −∂L/∂σ
        # σ = ½(a dx² + c dy²) + b dx dy, dx = px − mx: ∂σ/∂mx = −(a dx + b dy), ∂σ/∂my = −(b dx + c dy)
        # The sums Σ v_σ·{1, dx, dy, dx², dx dy, dy²} over a tile come from one matmul with the moments of
        # the tile-local pixel centres (dx = lx + ox, ox = x0 − mx the same for all pixels of a pair).
        k1, kx, ky, kxx, kxy, kyy = (-va @ _local_moments(tile, va.dtype, va.device)).unbind(-1)
        m = means2d.index_select(0, gid)
        ox, oy = x0.to(m.dtype) - m[:, 0], y0.to(m.dtype) - m[:, 1]
        su, sv = kx + ox * k1, ky + oy * k1  # Σ v_σ dx, Σ v_σ dy
        sxx = kxx + ox * (2.0 * kx + ox * k1)
        sxy = kxy + ox * ky + oy * kx + ox * oy * k1
        syy = kyy + oy * (2.0 * ky + oy * k1)
        v_o = -k1 / opacities.index_select(0, gid)
        a, b, c = conics.index_select(0, gid).unbind(-1)
        v_m = -torch.stack([a * su + b * sv, b * su + c * sv], dim=-1)
        v_conic = torch.stack([0.5 * sxx, sxy, 0.5 * syy], dim=-1)
        grad_means2d = torch.zeros_like(means2d).index_add_(0, gid, v_m)
        grad_conics = torch.zeros_like(conics).index_add_(0, gid, v_conic)
        grad_opac = torch.zeros_like(opacities).index_add_(0, gid, v_o)
        grad_features = torch.zeros_like(features).index_add_(0, gid, grad_f[:, :-1])
        return grad_means2d, grad_conics, grad_opac, grad_features, None, None, None, None, None, None


def rasterize_torch(
    splats: Splats, views: Views, backgrounds: Float[Tensor, "C 3"], eps2d: float = 0.3, near_plane: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Returns rgb [C,H,W,3], alpha [C,H,W,1], expected depth [C,H,W,1] and gsplat-like meta."""
    C, N = views.viewmats.shape[0], splats.means.shape[0]
    width, height, opacities, sh = views.width, views.height, splats.opacities, splats.sh
    radii, means2d, depths, conics = project(splats, views, eps2d=eps2d, near_plane=near_plane)
    campos = torch.linalg.inv(views.viewmats)[:, :3, 3]  # [C, 3]
    dirs = splats.means[None] - campos[:, None]  # SH is evaluated in the direction camera -> Gaussian
    colors = torch.clamp_min(_spherical_harmonics(splats.sh_degree, dirs, sh[None].expand(C, *sh.shape)) + 0.5, 0.0)
    features = torch.cat([colors, depths[..., None]], dim=-1).reshape(C * N, 4)

    tile = choose_tile(radii)
    gid, tile_id, x0, y0, tiles_x, tiles_y = _tile_pairs(means2d, radii, depths, width, height, tile)
    out = _Composite.apply(
        means2d.reshape(C * N, 2), conics.reshape(C * N, 3), opacities[None].expand(C, N).reshape(C * N),
        features, gid, tile_id, x0, y0, C * tiles_y * tiles_x, tile,
    )
    # [C·ty·tx, tile·tile, 5] -> [C, H, W, 5]
    out = out.reshape(C, tiles_y, tiles_x, tile, tile, 5).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(C, tiles_y * tile, tiles_x * tile, 5)[:, :height, :width]
    acc = out[..., 4:5]
    rgb = out[..., :3] + (1.0 - acc) * backgrounds[:, None, None, :]
    depth = out[..., 3:4] / acc.clamp_min(1e-10)
    meta = {
        "means2d": means2d,
        "radii": radii,
        "depths": depths,
        "conics": conics,
        "width": width,
        "height": height,
        "n_cameras": C,
        "gaussian_ids": None,
    }
    return rgb, acc, depth, meta
