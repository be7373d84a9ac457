"""Pure-PyTorch rasterizer, interpolator and antialiaser: the reference backend, runs on any device.

Same outputs as nvdiffrast (see `raster.py`), image row 0 at the top. Visibility is found without
gradients (per-triangle pixel boxes, an edge-function inside test in homogeneous coordinates and a
z-buffer built by `scatter_reduce` on packed (depth, triangle) keys); the barycentrics of the
visible triangle are then recomputed differentiably from `pos_clip`, so gradients reach vertex
positions through `rast` exactly as they do through nvdiffrast's rasterizer.
"""

from __future__ import annotations

import torch

from xdreamer.mesh import undirected_edge_keys

_EMPTY = torch.iinfo(torch.int64).max
_ID_BITS = 0xFFFFFFFF


def _pixel_centres(pixel: torch.Tensor, height: int, width: int, dtype: torch.dtype):
    """Flat pixel indices (within one image) -> NDC x, y of their centres, row 0 at NDC y = +1."""
    row, col = pixel // width, pixel % width
    x = (col.to(dtype) + 0.5) * (2.0 / width) - 1.0
    y = 1.0 - (row.to(dtype) + 0.5) * (2.0 / height)
    return x, y


def _homogeneous_edges(tri: torch.Tensor) -> torch.Tensor:
    """(..., 3, 4) clip-space triangles -> (..., 3, 3) edge coefficients.

    Row i holds (a, b, c) with e_i(x, y) = a x + b y + c = det(c_j, c_k, (x, y, 1)) for c = (x, y, w):
    the unnormalized perspective-correct barycentric of vertex i at NDC point (x, y) (Olano & Greer
    homogeneous rasterization, which needs no clipping against w = 0)."""
    xyw = tri[..., [0, 1, 3]]
    return torch.cross(xyw.roll(-1, dims=-2), xyw.roll(-2, dims=-2), dim=-1)


def _gather_vertices(values: torch.Tensor, image: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """values (B, V, C), image (N,), corners (N, 3) -> (N, 3, C); a flat index_select, whose
    backward (index_add) is much faster than advanced indexing's."""
    count = values.shape[1]
    index = corners + (image[:, None] * count if values.shape[0] > 1 else 0)
    channels = values.shape[-1]
    return values.reshape(-1, channels).index_select(0, index.reshape(-1)).view(*corners.shape, channels)


def rasterize(
    pos_clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], max_pixels: int = 1 << 22
) -> torch.Tensor:
    """pos_clip (B, V, 4), faces (F, 3) int64 -> rast (B, H, W, 4) = (u, v, z/w, triangle_id + 1).

    `max_pixels` bounds the (triangle, pixel) fragments depth-tested at once, i.e. the memory used."""
    height, width = resolution
    batch, faces_count = pos_clip.shape[0], faces.shape[0]
    device = pos_clip.device
    with torch.no_grad():
        tri = pos_clip.detach()[:, faces].double()  # (B, F, 3, 4)
        edges = _homogeneous_edges(tri)  # (B, F, 3, 3)
        det = (tri[..., 0, [0, 1, 3]] * edges[..., 0, :]).sum(-1)  # det(c0, c1, c2), (B, F)
        edges = edges * det.sign()[..., None, None]
        # A pixel centre p = (x, y, 1) is covered when every e_i(p) >= 0 and sum_i e_i(p) > 0 (the
        # point has w > 0), and its depth z/w = sum_i e_i(p) z_i / det lies in [-1, 1]: six
        # half-planes, all affine in the pixel position.
        depth = (edges * tri[..., 2:3]).sum(-2) / det.abs()[..., None]
        one = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)
        planes = torch.cat([edges, edges.sum(-2, keepdim=True), (one + depth)[..., None, :], (one - depth)[..., None, :]], dim=-2)
        # Pixel index (column c, row r) -> NDC (x, y) = (c * 2 / W + 1 / W - 1, 1 - 1 / H - r * 2 / H).
        to_ndc = torch.tensor(
            [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, -2.0 / height, 1.0 - 1.0 / height], [0.0, 0.0, 1.0]],
            dtype=torch.float64,
            device=device,
        )
        planes = planes @ to_ndc
        depth = depth @ to_ndc

        w = tri[..., 3]
        in_front = w > 0
        usable = in_front.any(-1) & (det != 0) & torch.isfinite(planes).flatten(-2).all(-1)
        # Row range from the projected vertices; triangles that cross w = 0 project to unbounded
        # regions, so they take every row and the half-planes do the rest.
        safe_w = torch.where(in_front, w, torch.ones_like(w))
        row = ((1.0 - tri[..., 1] / safe_w) * (height / 2) - 0.5).clamp(-2.0, height + 1.0)
        crosses = ~in_front.all(-1)
        y0 = torch.where(crosses, 0, row.amin(-1).ceil().long().clamp(min=0))
        y1 = torch.where(crosses, height - 1, row.amax(-1).floor().long().clamp(max=height - 1))
        rows = ((y1 - y0 + 1).clamp(min=0) * usable).reshape(-1)

        # One span of covered pixel centres per (triangle, row).
        instance = torch.repeat_interleave(torch.arange(rows.numel(), device=device), rows)
        first_row = (rows.cumsum(0) - rows)[instance]
        y = y0.reshape(-1)[instance] + torch.arange(instance.numel(), device=device) - first_row
        plane = planes.view(-1, 6, 3)[instance]
        slope = plane[..., 0]
        offset = plane[..., 1] * y[:, None].double() + plane[..., 2]
        bound = -offset / slope.where(slope != 0, torch.ones_like(slope))
        # A tiny widening keeps shared edges watertight against rounding; the z-buffer resolves
        # the doubly covered centres.
        slack = torch.tensor([1e-6, 1e-6, 1e-6, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        never = (slope == 0) & (offset < 0)
        lower = torch.where(slope > 0, bound - slack, -torch.inf).where(~never, torch.inf).amax(-1)
        upper = torch.where(slope < 0, bound + slack, torch.inf).amin(-1)
        x_lo = lower.clamp(-1.0, width).ceil().long()
        x_hi = upper.clamp(-1.0, width).floor().long().clamp(max=width - 1)
        x_lo = x_lo.clamp(min=0)
        span = (x_hi - x_lo + 1).clamp(min=0)
        keep = span > 0
        instance, y, x_lo, span = instance[keep], y[keep], x_lo[keep], span[keep]
        depth = depth.view(-1, 3)[instance]
        depth_slope = depth[:, 0].float()
        depth_start = (depth[:, 0] * x_lo + depth[:, 1] * y + depth[:, 2]).float()
        base = (instance // faces_count) * (height * width) + y * width + x_lo
        face = instance % faces_count

        keys = torch.full((batch * height * width,), _EMPTY, dtype=torch.int64, device=device)
        end = span.cumsum(0)
        total = int(end[-1]) if end.numel() else 0
        for start in range(0, total, max_pixels):
            stop = min(start + max_pixels, total)
            if start == 0 and stop == total:
                owner = torch.repeat_interleave(torch.arange(span.numel(), device=device), span, output_size=total)
            else:
                owner = torch.searchsorted(end, torch.arange(start, stop, device=device), right=True)
            step = torch.arange(start, stop, device=device) - (end - span)[owner]
            z = torch.addcmul(depth_start[owner], depth_slope[owner], step.float())
            # Depths shifted into [1, 3] are positive, so their float bits order like the depths.
            key = ((z + 2.0).clamp(1.0, 3.0).view(torch.int32).long() << 32) | face[owner]
            keys.scatter_reduce_(0, base[owner] + step, key, reduce="amin")

        pixel = (keys != _EMPTY).nonzero().squeeze(1)
        face = keys[pixel] & _ID_BITS

    rast = torch.zeros(batch * height * width, 4, device=device, dtype=pos_clip.dtype)
    if pixel.numel():
        image = pixel // (height * width)
        x, y = _pixel_centres(pixel % (height * width), height, width, pos_clip.dtype)
        verts = _gather_vertices(pos_clip, image, faces[face])  # (N, 3, 4), differentiable
        # det(c_j, c_k, p) with c = (x, y, w), p = (x_p, y_p, 1): subtracting w * p from the
        # vertex rows leaves the 2D cross product of a = x - w x_p and b = y - w y_p.
        a = verts[..., 0] - verts[..., 3] * x[:, None]
        b = verts[..., 1] - verts[..., 3] * y[:, None]
        bary = a.roll(-1, 1) * b.roll(-2, 1) - a.roll(-2, 1) * b.roll(-1, 1)
        total_bary = bary.sum(-1)
        u, v = bary[:, 0] / total_bary, bary[:, 1] / total_bary
        z_over_w = (bary * verts[..., 2]).sum(-1) / (bary * verts[..., 3]).sum(-1)
        values = torch.stack([u, v, z_over_w, (face + 1).to(pos_clip.dtype)], dim=-1)
        rast = rast.index_copy(0, pixel, values)
    return rast.view(batch, height, width, 4)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """attr (B or 1, V, C), rast (B, H, W, 4) -> (B, H, W, C), perspective-correct, 0 on background."""
    batch, height, width = rast.shape[:3]
    flat = rast.reshape(-1, 4)
    with torch.no_grad():
        tri = flat[:, 3].long()
        pixel = (tri > 0).nonzero().squeeze(1)
        face = tri[pixel] - 1
    out = torch.zeros(flat.shape[0], attr.shape[-1], device=attr.device, dtype=torch.promote_types(attr.dtype, rast.dtype))
    if pixel.numel():
        image = pixel // (height * width)
        corner = _gather_vertices(attr, image, faces[face])  # (N, 3, C)
        u, v = flat[pixel, 0:1], flat[pixel, 1:2]
        values = corner[:, 2] + u * (corner[:, 0] - corner[:, 2]) + v * (corner[:, 1] - corner[:, 2])
        out = out.index_copy(0, pixel, values.to(out.dtype))
    return out.view(batch, height, width, -1)


def edge_neighbors(faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) faces -> (F, 3): the face across the edge opposite vertex i, or -1 on a boundary.

    The antialiaser's topology (nvdiffrast's topology hash): an edge is a silhouette when it has
    no neighbour or its neighbour faces the other way."""
    count = faces.shape[0]
    if count == 0:
        return torch.empty(0, 3, dtype=torch.int64, device=faces.device)
    ends = torch.stack([faces.roll(-1, dims=1), faces.roll(-2, dims=1)], dim=-1).reshape(-1, 2)
    key, order = undirected_edge_keys(ends, int(faces.max()) + 1).sort(stable=True)
    same = (key[1:] == key[:-1]).nonzero().squeeze(1)
    neighbors = torch.full((count * 3,), -1, dtype=torch.int64, device=faces.device)
    first, second = order[same], order[same + 1]
    neighbors[first] = second // 3
    neighbors[second] = first // 3
    return neighbors.view(count, 3)


def _edge_vectors(sx, sy):
    """Screen-space triangles (N, 3) -> (ex, ey), each (N, 3): edge i runs from vertex i+1 to
    vertex i+2."""
    return sx.roll(-2, 1) - sx.roll(-1, 1), sy.roll(-2, 1) - sy.roll(-1, 1)


def _edge_values(sx, sy, ex, ey, ix, iy, ox, oy):
    """Screen-space edge functions of triangles (N, 3), with edge vectors ex, ey (N, 3) from
    `_edge_vectors`, at the inner and outer pixel centres (N,).

    Edge i is positive on vertex i's side; returns (at inner, at outer), each (N, 3)."""
    jx, jy = sx.roll(-1, 1), sy.roll(-1, 1)
    orientation = (ex[:, :1] * (sy[:, :1] - jy[:, :1]) - ey[:, :1] * (sx[:, :1] - jx[:, :1])).sign()
    at_inner = (ex * (iy[:, None] - jy) - ey * (ix[:, None] - jx)) * orientation
    at_outer = (ex * (oy[:, None] - jy) - ey * (ox[:, None] - jx)) * orientation
    return at_inner, at_outer


def _screen(pos: torch.Tensor, height: int, width: int):
    """(..., 4) clip -> pixel-unit x, y (centres at integers, row 0 at the top) and w > 0."""
    w = pos[..., 3]
    in_front = w > 0
    w = torch.where(in_front, w, torch.ones_like(w))
    return (pos[..., 0] / w + 1.0) * (width / 2) - 0.5, (1.0 - pos[..., 1] / w) * (height / 2) - 0.5, in_front


def antialias(
    color: torch.Tensor,
    rast: torch.Tensor,
    pos_clip: torch.Tensor,
    faces: torch.Tensor,
    neighbors: torch.Tensor | None = None,
    max_steps: int = 8,
) -> torch.Tensor:
    """color (B, H, W, C), rast (B, H, W, 4), pos_clip (B, V, 4) -> antialiased (B, H, W, C).
    See `antialias_each`."""
    return antialias_each([color], rast, pos_clip, faces, neighbors, max_steps)[0]


def antialias_each(
    colors: list[torch.Tensor],
    rast: torch.Tensor,
    pos_clip: torch.Tensor,
    faces: torch.Tensor,
    neighbors: torch.Tensor | None = None,
    max_steps: int = 8,
) -> list[torch.Tensor]:
    """colors: images (B, H, W, C_i) of one rasterization -> each antialiased, exactly as its own
    `antialias` call would give it (values and gradients), with the silhouette search, most of
    the cost, done once.

    Laine et al. 2020: each horizontal or vertical pixel pair with different triangle ids is
    checked for a silhouette edge crossing the segment between the two pixel centres; the
    crossing point t (0 at the centre covered by the nearer triangle, 1 at the other) blends the
    colours as a one-pixel box filter would, which makes the result differentiable in vertex
    positions through t. An edge counts for the pairs of the direction it is the more
    perpendicular to (horizontal pairs: edges at least as steep as 45 degrees), as in nvdiffrast,
    so the coverage moves as fast as the silhouette's area. The silhouette is found by walking
    from the nearer triangle across front-to-front edges along the segment (at most `max_steps`
    triangles), so sliver triangles that cover no pixel centre, common near the silhouette of fine
    meshes, do not hide it."""
    batch, height, width = rast.shape[:3]
    if neighbors is None:
        neighbors = edge_neighbors(faces)
    plane = height * width
    with torch.no_grad():
        tri = rast[..., 3].long()
        depth = rast[..., 2].reshape(-1)
        flat_tri = tri.reshape(-1)
        pairs = []
        for step, differ in ((1, tri[:, :, 1:] != tri[:, :, :-1]), (width, tri[:, 1:, :] != tri[:, :-1, :])):
            b, y, x = differ.nonzero().unbind(-1)
            first = b * plane + y * width + x
            pairs.append(torch.stack([first, first + step], dim=-1))
        pa, pb = torch.cat(pairs).unbind(-1)
        ta, tb = flat_tri[pa], flat_tri[pb]
        a_covers = (tb == 0) | ((ta != 0) & (depth[pa] < depth[pb]))
        inner = torch.where(a_covers, pa, pb)
        outer = torch.where(a_covers, pb, pa)
        face = torch.where(a_covers, ta, tb) - 1
        other = torch.where(a_covers, tb, ta) - 1
        image = inner // plane
        tri_pos = pos_clip.detach()[:, faces]
        edges = _homogeneous_edges(tri_pos)
        front = (tri_pos[..., 0, [0, 1, 3]] * edges[..., 0, :]).sum(-1) > 0  # (B, F) facing
        # Most pairs lie inside one surface, in two triangles sharing an edge and facing the same
        # way: no silhouette can lie between them, so they skip the walk.
        joined = (other >= 0) & (neighbors[face] == other[:, None]).any(-1)
        joined &= front[image, face] == front[image, other.clamp(min=0)]
        pair = (~joined).nonzero().squeeze(1)
        inner, outer, face, image = inner[pair], outer[pair], face[pair], image[pair]
        ix, iy = (inner % width).to(pos_clip.dtype), (inner % plane // width).to(pos_clip.dtype)
        ox, oy = (outer % width).to(pos_clip.dtype), (outer % plane // width).to(pos_clip.dtype)

        sx_all, sy_all, in_front_all = _screen(pos_clip.detach(), height, width)
        facing = front[image, face]
        horizontal = iy == oy

        current = face.clone()
        active = torch.ones_like(face, dtype=torch.bool)
        found = torch.zeros_like(active)
        exit_edge = torch.zeros_like(face)
        for _ in range(max_steps):
            corners = faces[current]
            sx, sy = sx_all[image[:, None], corners], sy_all[image[:, None], corners]
            usable = in_front_all[image[:, None], corners].all(-1)
            edge_x, edge_y = _edge_vectors(sx, sy)
            at_inner, at_outer = _edge_values(sx, sy, edge_x, edge_y, ix, iy, ox, oy)
            # Along the segment an edge function falls linearly; the triangle is left where the
            # first falling one reaches 0.
            falling = at_inner - at_outer
            t, edge = torch.where(falling > 0, at_inner / falling.where(falling > 0, 1.0), torch.inf).min(-1)
            across = neighbors[current, edge]
            silhouette = (across < 0) | (front[image, across.clamp(min=0)] != facing)
            crossing = active & usable & (t <= 1.0)
            hit = crossing & silhouette
            # Each silhouette edge is taken by the pairs of one direction only, those it is the
            # more perpendicular to (horizontal pairs: edges at least as steep as 45 degrees), as
            # in nvdiffrast: taken by both, it would move twice the coverage it moves.
            ex, ey = (e.gather(1, edge[:, None]).squeeze(1).abs() for e in (edge_x, edge_y))
            found |= hit & torch.where(horizontal, ey >= ex, ex >= ey)
            exit_edge = torch.where(hit, edge, exit_edge)
            active = crossing & ~silhouette
            current = torch.where(active, across, current)
            if not bool(active.any()):
                break
        keep = found.nonzero().squeeze(1)
        face, exit_edge, image = current[keep], exit_edge[keep], image[keep]
        inner, outer = inner[keep], outer[keep]
        ix, iy, ox, oy = ix[keep], iy[keep], ox[keep], oy[keep]

    corners = faces[face]
    results = []
    for color in colors:
        # The crossing points are recomputed per image, so that each image's gradient reaches
        # pos_clip through its own graph, summed in the same order as separate calls sum it.
        sx, sy, _ = _screen(_gather_vertices(pos_clip, image, corners), height, width)  # differentiable
        at_inner, at_outer = _edge_values(sx, sy, *_edge_vectors(sx, sy), ix, iy, ox, oy)
        at_inner, at_outer = at_inner.gather(1, exit_edge[:, None]), at_outer.gather(1, exit_edge[:, None])
        t = (at_inner / (at_inner - at_outer)).clamp(0.0, 1.0).to(color.dtype)
        flat = color.reshape(-1, color.shape[-1])
        c_in, c_out = flat[inner], flat[outer]
        spills = t > 0.5  # the covering surface reaches into the outer pixel, else misses part of its own
        target = torch.where(spills[:, 0], outer, inner)
        delta = torch.where(spills, (t - 0.5) * (c_in - c_out), (0.5 - t) * (c_out - c_in))
        results.append(flat.index_add(0, target, delta).view(color.shape))
    return results
