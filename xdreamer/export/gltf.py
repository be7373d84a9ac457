"""Binary glTF 2.0 (GLB) with a metallicRoughness PBR material.

Textures (PNG, embedded): baseColorTexture (sRGB), metallicRoughnessTexture (linear: G =
roughness, B = metallic) which also serves as occlusionTexture (R = visibility = 1 -
occlusion), and a tangent-space normalTexture. The primitive carries POSITION (with min/max),
NORMAL, TANGENT (w = handedness) and TEXCOORD_0 (glTF's top-left UV origin, as Mesh.uvs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xdreamer.atomic import write_bytes
from xdreamer.export.bake import encode_png, texture_images
from xdreamer.mesh import Mesh
from xdreamer.render.shade import vertex_tangents, welded_vertex_normals

ARRAY_BUFFER = 34962
ELEMENT_ARRAY_BUFFER = 34963
FLOAT = 5126
UNSIGNED_INT = 5125
LINEAR = 9729
LINEAR_MIPMAP_LINEAR = 9987
REPEAT = 10497


def glb_bytes(mesh: Mesh, maps: dict[str, torch.Tensor]) -> bytes:
    """The GLB file for a UV-mapped mesh and its `bake_textures` maps."""
    import pygltflib as g

    if mesh.uvs is None:
        raise ValueError("GLB export needs a mesh with uvs; unwrap and bake it first")
    mesh = mesh.detach().to("cpu")
    normals = welded_vertex_normals(mesh)
    arrays = {
        "POSITION": mesh.vertices.numpy().astype(np.float32),
        "NORMAL": normals.numpy().astype(np.float32),
        "TANGENT": vertex_tangents(mesh, normals).numpy().astype(np.float32),
        "TEXCOORD_0": mesh.uvs.numpy().astype(np.float32),
    }
    indices = mesh.faces.numpy().astype(np.uint32).reshape(-1)
    images = texture_images(maps)
    pngs = [encode_png(images["base_color"]), encode_png(images["orm"]), encode_png(images["normal"])]

    blob = bytearray()
    buffer_views, accessors = [], []

    def add_view(data: bytes, target: int | None) -> int:
        blob.extend(b"\0" * (-len(blob) % 4))  # every view starts 4-byte aligned
        buffer_views.append(g.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data), target=target))
        blob.extend(data)
        return len(buffer_views) - 1

    attributes = {}
    for name, array in arrays.items():
        view = add_view(array.tobytes(), ARRAY_BUFFER)
        accessor = g.Accessor(
            bufferView=view, componentType=FLOAT, count=array.shape[0], type={2: "VEC2", 3: "VEC3", 4: "VEC4"}[array.shape[1]]
        )
        if name == "POSITION":
            accessor.min = array.min(0).tolist()
            accessor.max = array.max(0).tolist()
        accessors.append(accessor)
        attributes[name] = len(accessors) - 1
    view = add_view(indices.tobytes(), ELEMENT_ARRAY_BUFFER)
    accessors.append(
        g.Accessor(bufferView=view, componentType=UNSIGNED_INT, count=indices.size, type="SCALAR",
                   min=[int(indices.min())], max=[int(indices.max())])
    )
    index_accessor = len(accessors) - 1
    image_views = [add_view(png, None) for png in pngs]
    blob.extend(b"\0" * (-len(blob) % 4))

    material = g.Material(
        name="material_0",
        pbrMetallicRoughness=g.PbrMetallicRoughness(
            baseColorTexture=g.TextureInfo(index=0),
            metallicRoughnessTexture=g.TextureInfo(index=1),
            metallicFactor=1.0,
            roughnessFactor=1.0,
        ),
        normalTexture=g.NormalMaterialTexture(index=2),
        occlusionTexture=g.OcclusionTextureInfo(index=1),
        doubleSided=False,
    )
    gltf = g.GLTF2(
        asset=g.Asset(version="2.0", generator="xdreamer"),
        scene=0,
        scenes=[g.Scene(nodes=[0])],
        nodes=[g.Node(mesh=0, name="xdreamer")],
        meshes=[g.Mesh(primitives=[g.Primitive(attributes=g.Attributes(**attributes), indices=index_accessor, material=0)])],
        materials=[material],
        textures=[g.Texture(sampler=0, source=i) for i in range(3)],
        samplers=[g.Sampler(magFilter=LINEAR, minFilter=LINEAR_MIPMAP_LINEAR, wrapS=REPEAT, wrapT=REPEAT)],
        images=[g.Image(bufferView=v, mimeType="image/png") for v in image_views],
        accessors=accessors,
        bufferViews=buffer_views,
        buffers=[g.Buffer(byteLength=len(blob))],
    )
    gltf.set_binary_blob(bytes(blob))
    return b"".join(gltf.save_to_bytes())


def write_glb(path: str | Path, mesh: Mesh, maps: dict[str, torch.Tensor]) -> Path:
    """Write the GLB of `glb_bytes` to `path` atomically."""
    path = Path(path)
    write_bytes(path, glb_bytes(mesh, maps))
    return path
