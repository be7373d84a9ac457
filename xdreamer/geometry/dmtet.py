"""DMTet (Shen et al. 2021): a network gives every tet-grid vertex an SDF value and an offset;
marching tetrahedra turns them into a triangle mesh, differentiably in both."""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from xdreamer.encoding import MLP, FrequencyEncoding, HashEncoding
from xdreamer.geometry.tets import tetrahedral_grid
from xdreamer.mesh import Mesh

# The 6 edges of a tetrahedron as pairs of its local vertices.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


class GeometryError(ValueError):
    """A DMTet configuration that cannot be built."""


def _triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """The 16-case marching-tetrahedra table, derived from the sign patterns.

    Case = sum of 2^i over the inside vertices i (SDF < 0). Returns triangles (16, 2, 3) of local
    edge indices into TET_EDGES (-1 pads) and the triangle count (16,). Triangles face outward
    for a positively oriented tet. Orientation is fixed on the reference tet with edge midpoints;
    it holds for any crossing points on the same edges of any positive tet, since the sign of
    each triangle's volume with an inside vertex only scales by positive edge parameters."""
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    edge_of = {frozenset(e): i for i, e in enumerate(TET_EDGES)}
    midpoint = np.array([(ref[a] + ref[b]) / 2 for a, b in TET_EDGES])
    table = np.full((16, 2, 3), -1, dtype=np.int64)
    counts = np.zeros(16, dtype=np.int64)
    for case in range(16):
        inside = [i for i in range(4) if case >> i & 1]
        outside = [i for i in range(4) if not case >> i & 1]
        if len(inside) in (0, 4):
            continue
        if len(inside) == 2:
            (a, b), (c, d) = inside, outside
            # the crossing quad, in cycle order: edges ac, ad, bd, bc
            quad = [edge_of[frozenset(p)] for p in ((a, c), (a, d), (b, d), (b, c))]
            triangles = [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
        else:
            lone = inside[0] if len(inside) == 1 else outside[0]
            triangles = [[edge_of[frozenset((lone, o))] for o in range(4) if o != lone]]
        outward = ref[outside].mean(0) - ref[inside].mean(0)
        for t, tri in enumerate(triangles):
            p = midpoint[tri]
            if np.dot(np.cross(p[1] - p[0], p[2] - p[0]), outward) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[case, t] = tri
        counts[case] = len(triangles)
    return table, counts


_TRIANGLES, _TRIANGLE_COUNTS = _triangle_table()


def marching_tetrahedra(
    vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the zero level set of `sdf` (negative inside) as a triangle mesh.

    vertices: (N, 3); tets: (T, 4) int64, positively oriented; sdf: (N,). Returns verts (V, 3),
    differentiable wrt vertices and sdf, one per sign-changing grid edge (so neighbouring
    triangles share vertices), and faces (F, 3) int64 counter-clockwise seen from outside."""
    device = vertices.device
    with torch.no_grad():
        inside = sdf < 0
        inside_tet = inside[tets]  # (T, 4)
        n_inside = inside_tet.sum(dim=1)
        crossing_tets = (n_inside > 0) & (n_inside < 4)
        tets = tets[crossing_tets]
        case = (inside_tet[crossing_tets].long() * torch.tensor([1, 2, 4, 8], device=device)).sum(dim=1)

        edge_pairs = torch.tensor(TET_EDGES, device=device)
        ends = tets[:, edge_pairs]  # (T', 6, 2)
        crosses = inside[ends[..., 0]] != inside[ends[..., 1]]  # (T', 6)
        ends = ends[crosses]
        # one int64 key per undirected edge makes the dedup a fast 1-D unique over crossing edges only
        n = vertices.shape[0]
        keys = torch.minimum(ends[:, 0], ends[:, 1]) * n + torch.maximum(ends[:, 0], ends[:, 1])
        unique_keys, vertex_index = torch.unique(keys, return_inverse=True)
        crossing_edges = torch.stack([unique_keys // n, unique_keys % n], dim=1)
        tet_vertex = torch.full(crosses.shape, -1, dtype=torch.int64, device=device)
        tet_vertex[crosses] = vertex_index  # (T', 6): output vertex of each crossing tet edge

        table = torch.as_tensor(_TRIANGLES, device=device)[case]  # (T', 2, 3)
        counts = torch.as_tensor(_TRIANGLE_COUNTS, device=device)[case]
        rows = torch.arange(tets.shape[0], device=device)
        faces = [tet_vertex[rows[:, None], table[:, 0]]]
        two = counts == 2
        faces.append(tet_vertex[rows[two][:, None], table[two, 1]])
        faces = torch.cat(faces, dim=0)

    v_a, v_b = vertices[crossing_edges[:, 0]], vertices[crossing_edges[:, 1]]
    s_a, s_b = sdf[crossing_edges[:, 0], None], sdf[crossing_edges[:, 1], None]
    # the linear interpolant's zero; s_b - s_a is never 0 because the signs differ
    verts = (v_a * s_b - v_b * s_a) / (s_b - s_a)
    return verts, faces


class DMTetGeometry(nn.Module):
    """The geometry of the geometry stage: tet grid + network (encoding, MLP) -> SDF + offset -> Mesh.

    The grid spans [-grid_scale / 2, grid_scale / 2]^3 in world units, in cells of
    grid_scale / grid_resolution. Each vertex moves by tanh(offset) * max_offset along each axis.
    max_offset defaults to the authors' bound, 1 / grid_resolution world units (X-Dreamer's
    geometry/dmtet_x_dreamer.py, after nvdiffrec and Fantasia3D: `verts * scale + 1 / grid_res *
    tanh(deform)`), which is 1 / grid_scale cells: 0.48 of a cell at the default scale 2.1.

    That bound does not rule out inverted tetrahedra, whose triangles may face inward: on this
    Kuhn grid a tetrahedron can invert as soon as vertices may move more than 1/6 of a cell per
    axis, and at the authors' bound about 13% invert when every vertex sits at a random corner of
    its box. max_offset = grid_scale / (6 * grid_resolution) or less rules inversion out.
    encoding: "hash" (Instant NGP, the paper's) or "frequency"."""

    def __init__(
        self,
        grid_resolution: int = 128,
        grid_scale: float = 2.1,
        encoding: str = "hash",
        hash_log2_table_size: int = 19,
        hash_backend: str = "auto",
        frequency_count: int = 6,
        max_offset: float | None = None,
        bound_radius: float | None = None,
    ) -> None:
        super().__init__()
        if not grid_scale > 0:
            raise GeometryError(f"grid_scale must be positive, got {grid_scale}")
        if max_offset is not None and not max_offset > 0:
            raise GeometryError(f"max_offset must be positive (world units), got {max_offset}")
        if bound_radius is not None and not bound_radius > 0:
            raise GeometryError(f"bound_radius must be positive (world units), got {bound_radius}")
        if encoding == "hash":
            self.encoding = HashEncoding(log2_table_size=hash_log2_table_size, backend=hash_backend)
        elif encoding == "frequency":
            self.encoding = FrequencyEncoding(n_frequencies=frequency_count)
        else:
            raise GeometryError(f"geometry encoding must be 'hash' or 'frequency', got {encoding!r}")
        self.grid_resolution = grid_resolution
        self.grid_scale = float(grid_scale)
        self.max_offset = 1.0 / grid_resolution if max_offset is None else float(max_offset)
        self.mlp = MLP(self.encoding.output_dim, 4, hidden=32, n_hidden_layers=2)
        # Offsets start at exactly zero (the undeformed grid), as in DMTet; they still learn
        # because the weights feeding them get gradients from the hidden features.
        with torch.no_grad():
            self.mlp.output_layer.weight[1:].zero_()
            self.mlp.output_layer.bias[1:].zero_()
        grid_vertices, tets = tetrahedral_grid(grid_resolution)
        # the grid is regenerated from the cache, so it stays out of checkpoints
        self.register_buffer("grid_vertices", grid_vertices, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.bound_radius = bound_radius

    def _network(self, grid_points: torch.Tensor) -> torch.Tensor:
        """grid_points: (M, 3) in grid units [-0.5, 0.5]^3 -> (M, 4) raw outputs."""
        return self.mlp(self.encoding((grid_points + 0.5).clamp(0, 1)))

    def sdf_and_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """SDF (N,) at the grid vertices and raw offsets (N, 3) before tanh. With `bound_radius`
        the SDF is max(network, |x| - bound_radius), the intersection with the ball: where the
        ball's side is the larger the network gets no gradient."""
        out = self._network(self.grid_vertices)
        return self._bounded(out[:, 0], self.grid_vertices * self.grid_scale), out[:, 1:]

    def _bounded(self, sdf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """sdf (M,) at world points (M, 3), intersected with the `bound_radius` ball if any."""
        if self.bound_radius is None:
            return sdf
        return torch.maximum(sdf, points.norm(dim=-1) - self.bound_radius)

    def deformed_vertices(self, offset: torch.Tensor) -> torch.Tensor:
        """offset: (N, 3) raw -> (N, 3) world positions of the grid vertices moved by
        tanh(offset) * max_offset (at most max_offset world units along each axis)."""
        return self.grid_vertices * self.grid_scale + torch.tanh(offset) * self.max_offset

    def sdf_at(self, points: torch.Tensor) -> torch.Tensor:
        """The SDF at world points (M, 3) -> (M,), bounded as at the grid vertices; points outside
        the grid are clamped."""
        return self._bounded(self._network(points / self.grid_scale)[:, 0], points)

    def forward(self) -> Mesh:
        """Extract the current surface as a Mesh (world units, outward faces)."""
        sdf, offset = self.sdf_and_offset()
        verts, faces = marching_tetrahedra(self.deformed_vertices(offset), self.tets, sdf)
        return Mesh(vertices=verts, faces=faces)
