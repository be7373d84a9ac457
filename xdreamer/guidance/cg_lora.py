"""CG-LoRA (camera-guided low-rank adaptation) and the attention processors that carry it.

Each adapted linear W0 (d_in -> d_out) of SD's attention becomes
x -> W0 x + scale * dropout(B (A^T x)), where the down matrix A (d_in x r) is generated per sample
from the text feature f_t and the camera feature f_c = MLP(c): A = reshape(concat(P_t f_t, P_c f_c)),
and the up matrix B (r -> d_out) starts at zero, so training starts from the pretrained UNet exactly.

Where METHOD (the paper) is silent, this follows the authors' `lora.py`: A is the concat reshaped
row-major to (d_in, r), so the text drives the first d_in/2 input channels and the camera the rest;
the update is scaled by 0.1 and passes a dropout of 0.1 (the paper's formula has neither: set
`scale=1, dropout=0` for it); P_t and P_c start Xavier-uniform; the camera MLP ends in a ReLU.

The adapters live in `CameraGuidedLoRA`, a module separate from the frozen UNet; they reach the
UNet through diffusers' attention-processor mechanism (`install_attention_processors`), which
also wires the AMA `AttentionRecorder` into the cross-attention layers.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from xdreamer.atomic import atomic_path
from xdreamer.guidance.ama import AttentionRecorder

CAMERA_FEATURE_DIM = 6
TARGETS = ("all", "cross")
OPTIMIZERS = ("normalized_sgd", "sgd", "adamw")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class CGLoRAError(ValueError):
    """A user-caused misuse of CG-LoRA (bad configuration, missing or mismatched condition)."""


class CameraMLP(nn.Module):
    """f_c = MLP(c): (N, 6) normalized camera numbers -> (N, feature_dim), 6 -> hidden -> feature_dim,
    ReLU after both layers (the authors' CameraEncoder), so f_c >= 0."""

    def __init__(self, feature_dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(CAMERA_FEATURE_DIM, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU()
        )

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.net(camera)


def _projections(attn: Attention) -> dict[str, nn.Linear]:
    """The four linears CG-LoRA adapts in one attention layer, by the names used in its state dict."""
    return {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}


def _low_rank_projection(feature_dim: int, out_dim: int, inner: int = 4) -> nn.Sequential:
    # P = U V with a 4-wide bottleneck, no biases: a pure low-rank linear map of the feature.
    projection = nn.Sequential(nn.Linear(feature_dim, inner, bias=False), nn.Linear(inner, out_dim, bias=False))
    for layer in projection:
        nn.init.xavier_uniform_(layer.weight)
    return projection


class CGLoRALinear(nn.Module):
    """The CG-LoRA update of one linear layer W0 (in_features -> out_features).

    text_projection (P_t) and camera_projection (P_c) map f_t and f_c to in_features*rank/2 numbers
    each; their concatenation reshaped row-major to (in_features, rank) is A. up (B) is
    zero-initialized. The update is scale * dropout(B (A^T x)); the dropout mask is drawn from a
    generator seeded with the UNet call's seed + `index` (this adapter's number), never from
    torch's global stream: a recomputation of the call (gradient checkpointing) draws the same mask."""

    def __init__(
        self, in_features: int, out_features: int, feature_dim: int, rank: int = 4, scale: float = 0.1,
        dropout: float = 0.1, index: int = 0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise CGLoRAError(f"CG-LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scale = scale
        self.dropout = dropout
        self.index = index
        half = in_features * rank // 2
        self.text_projection = _low_rank_projection(feature_dim, half)
        self.camera_projection = _low_rank_projection(feature_dim, in_features * rank - half)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def down(self, text_features: torch.Tensor, camera_features: torch.Tensor) -> torch.Tensor:
        """(N, D), (N, D) -> A: (N, in_features, rank), one down matrix per sample."""
        generated = torch.cat([self.text_projection(text_features), self.camera_projection(camera_features)], dim=-1)
        return generated.view(-1, self.in_features, self.rank)

    def forward(
        self,
        x: torch.Tensor,
        text_features: torch.Tensor,
        camera_features: torch.Tensor,
        seed: int | None = None,
    ) -> torch.Tensor:
        """x: (N, L, in_features) -> the update scale * dropout(B (A^T x)): (N, L, out_features), in
        x's dtype. Dropout is active in training mode and needs the UNet call's `seed`."""
        down = self.down(text_features, camera_features)
        update = self.up(torch.bmm(x.to(down.dtype), down))  # (N, L, out_features)
        if self.training and self.dropout > 0.0:
            if seed is None:
                raise CGLoRAError("CG-LoRA dropout in training mode needs the UNet call's seed")
            generator = torch.Generator(device=update.device).manual_seed(seed + self.index)
            keep = torch.rand(update.shape, generator=generator, device=update.device) >= self.dropout
            update = update * keep / (1.0 - self.dropout)
        return (self.scale * update).to(x.dtype)


class CameraGuidedLoRA(nn.Module):
    """CG-LoRA for a UNet: a shared camera MLP plus one `CGLoRALinear` per adapted projection.

    unet: the (frozen) UNet2DConditionModel whose attention layers are adapted; it is only read
        here, not stored, so `parameters()` are the adapters alone.
    text_feature_dim: D, the width of f_t (the text encoder's hidden size; 768 SD1, 1024 SD2).
    targets: "all" = to_q, to_k, to_v, to_out[0] of every attention, self and cross (the paper:
        "the linear embedding layers of SD's attention modules"); "cross" = the same projections of
        the cross-attentions only (the authors' code).
    scale, dropout: of the update (the authors' 0.1 and 0.1; the paper's formula is scale 1, no dropout).
    seed: seeds the adapters' own dropout generator (its state is part of `generator_state()`).
    camera_mlp: a `CameraMLP` of width text_feature_dim to use (built elsewhere, e.g. from its own
        seed); a fresh one by default.
    projections: which of to_q, to_k, to_v, to_out are adapted (all four in the paper and the
        authors' code; to_q and to_k change where attention goes but not what it writes).

    Before each UNet call, `set_condition` gives the per-sample text and camera features of that
    call's batch (N = 2B, ordered [uncond; cond])."""

    def __init__(
        self,
        unet: nn.Module,
        text_feature_dim: int,
        rank: int = 4,
        targets: str = "all",
        camera_hidden: int = 512,
        scale: float = 0.1,
        dropout: float = 0.1,
        seed: int = 0,
        camera_mlp: CameraMLP | None = None,
        projections: tuple[str, ...] = PROJECTIONS,
    ):
        super().__init__()
        if not projections or not set(projections) <= set(PROJECTIONS):
            raise CGLoRAError(f"CG-LoRA projections must be some of {', '.join(PROJECTIONS)}, got {list(projections)}")
        if targets not in TARGETS:
            raise CGLoRAError(f"CG-LoRA targets must be one of {TARGETS}, got {targets!r}")
        if rank < 2 or rank % 2:
            raise CGLoRAError(f"CG-LoRA rank must be even (text and camera halves), got {rank}")
        self.rank = rank
        self.targets = targets
        self.text_feature_dim = text_feature_dim
        self.scale = scale
        self.dropout = dropout
        self.camera_mlp = CameraMLP(text_feature_dim, camera_hidden) if camera_mlp is None else camera_mlp
        if self.camera_mlp.net[-2].out_features != text_feature_dim:
            raise CGLoRAError(f"the camera MLP must output {text_feature_dim} features")
        self.layers = nn.ModuleDict()
        self.layer_paths: dict[str, str] = {}  # attention module path in the UNet -> key in self.layers
        count = 0
        for path, module in unet.named_modules():
            if not isinstance(module, Attention) or (targets == "cross" and not module.is_cross_attention):
                continue
            key = path.replace(".", "_")
            self.layers[key] = nn.ModuleDict()
            for name, linear in _projections(module).items():
                if name not in projections:
                    continue
                self.layers[key][name] = CGLoRALinear(
                    linear.in_features, linear.out_features, text_feature_dim, rank, scale, dropout, index=count
                )
                count += 1
            self.layer_paths[path] = key
        if not self.layer_paths:
            raise CGLoRAError("the UNet has no attention layers to adapt")
        # The dropout stream lives on the CPU whatever the adapters' device: one draw per UNet
        # call (no device sync), and a checkpointed state that resumes on any machine.
        self._generator = torch.Generator().manual_seed(seed)
        self._call_seed: int | None = None
        self._text_features: torch.Tensor | None = None
        self._camera: torch.Tensor | None = None

    def adapters(self, path: str) -> nn.ModuleDict | None:
        """The projections' adapters of the attention at `path` in the UNet, or None if not adapted."""
        key = self.layer_paths.get(path)
        return None if key is None else self.layers[key]

    def up_parameters(self) -> list[nn.Parameter]:
        """The adapters' trainable tensors: text/camera projections and up matrices (not the camera MLP)."""
        return [p for name, p in self.named_parameters() if not name.startswith("camera_mlp.")]

    def generator_state(self) -> torch.Tensor:
        """(uint8) state of the dropout stream (a CPU generator), for checkpoints."""
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def set_condition(self, text_features: torch.Tensor, camera_features: torch.Tensor) -> None:
        """text_features: (N, D) f_t per UNet-call sample (the empty prompt's for the uncond half);
        camera_features: (N, 6) `Cameras.features()`, repeated for both halves."""
        if text_features.ndim != 2 or text_features.shape[1] != self.text_feature_dim:
            raise CGLoRAError(
                f"text features must be (N, {self.text_feature_dim}), got shape {tuple(text_features.shape)}"
            )
        if camera_features.shape != (text_features.shape[0], CAMERA_FEATURE_DIM):
            raise CGLoRAError(
                f"camera features must be ({text_features.shape[0]}, {CAMERA_FEATURE_DIM}), "
                f"got shape {tuple(camera_features.shape)}"
            )
        self._text_features = text_features
        self._camera = camera_features
        # One seed per UNet call: every adapter's dropout mask derives from it (see CGLoRALinear).
        self._call_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))

    def clear_condition(self) -> None:
        self._text_features = None
        self._camera = None

    def condition(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(f_t, f_c, the call's dropout seed), f_t and f_c (N, D) in the adapters' dtype, for a
        UNet call of `batch_size` samples."""
        if self._text_features is None:
            raise CGLoRAError("CameraGuidedLoRA.set_condition must be called before the UNet call")
        if self._text_features.shape[0] != batch_size:
            raise CGLoRAError(
                f"CG-LoRA condition has {self._text_features.shape[0]} samples but the UNet call has {batch_size}"
            )
        weight = self.camera_mlp.net[0].weight
        text = self._text_features.to(weight.device, weight.dtype)
        camera = self.camera_mlp(self._camera.to(weight.device, weight.dtype))
        return text, camera, self._call_seed

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable tensors (camera MLP + adapters), on the CPU."""
        return {name: value.detach().to("cpu", copy=True) for name, value in self.state_dict().items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `lora_state_dict()`; keys and shapes must match this UNet, rank and targets."""
        own = self.state_dict()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise CGLoRAError(f"CG-LoRA weights do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise CGLoRAError(
                    f"CG-LoRA weight {name} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}"
                )
        self.load_state_dict(state)

    def save(self, path: str | Path) -> Path:
        """Write the weights as safetensors (atomically), with the settings in the metadata."""
        path = Path(path)
        metadata = {
            "rank": str(self.rank), "targets": self.targets, "text_feature_dim": str(self.text_feature_dim),
            "scale": str(self.scale), "dropout": str(self.dropout), "layout": "A = reshape(concat, (d_in, rank))",
        }
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(self.lora_state_dict(), str(tmp), metadata=metadata)
        return path

    def load(self, path: str | Path) -> None:
        """Load weights written by `save`."""
        self.load_lora_state_dict(safetensors.torch.load_file(str(path)))


class XDreamerAttnProcessor:
    """diffusers attention processor: AttnProcessor2_0's computation, with CG-LoRA on to_q, to_k,
    to_v, to_out[0] and, in cross-attention, the AMA recording. A plain object (not an nn.Module)
    so the adapters never become UNet parameters.

    With zero up matrices and no recorder the output equals AttnProcessor2_0's exactly."""

    def __init__(
        self,
        lora: CameraGuidedLoRA | None = None,
        adapters: nn.ModuleDict | None = None,
        recorder: AttentionRecorder | None = None,
    ):
        self.lora = lora
        self.adapters = adapters
        self.recorder = recorder

    def _project(self, linear: nn.Module, name: str, x: torch.Tensor, condition) -> torch.Tensor:
        out = linear(x)
        if self.adapters is not None and name in self.adapters:
            out = out + self.adapters[name](x, *condition)
        return out

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        condition = self.lora.condition(batch_size) if self.adapters is not None else None

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._project(attn.to_q, "to_q", hidden_states, condition)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self._project(attn.to_k, "to_k", encoder_hidden_states, condition)
        value = self._project(attn.to_v, "to_v", encoder_hidden_states, condition)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.recorder is not None and is_cross:
            self.recorder.record(query, key, attention_mask)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = self._project(attn.to_out[0], "to_out", hidden_states, condition)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_attention_processors(
    unet: nn.Module, lora: CameraGuidedLoRA | None = None, recorder: AttentionRecorder | None = None
) -> None:
    """Route the UNet's attention through `XDreamerAttnProcessor` where needed and freeze the UNet.

    Layers adapted by `lora` get their adapters; cross-attention layers get `recorder` (AMA); any
    other layer keeps its processor (e.g. the loader's sliced attention), except that one left by
    an earlier install goes back to AttnProcessor2_0. With neither (CG-LoRA and AMA both off) the
    UNet is left untouched. The ablation "AMA without CG-LoRA" is lora=None with a recorder."""
    if lora is None and recorder is None:
        return
    modules = dict(unet.named_modules())
    if lora is not None:
        for path, key in lora.layer_paths.items():
            module = modules.get(path)
            if not isinstance(module, Attention) or any(
                linear.in_features != lora.layers[key][name].in_features
                or linear.out_features != lora.layers[key][name].out_features
                for name, linear in _projections(module).items()
                if name in lora.layers[key]
            ):
                raise CGLoRAError(f"CG-LoRA was built for another UNet: no matching attention at {path!r}")
    processors = {}
    for name, current in unet.attn_processors.items():
        path = name.removesuffix(".processor")
        module = modules[path]
        adapters = lora.adapters(path) if lora is not None else None
        layer_recorder = recorder if module.is_cross_attention else None
        if adapters is None and layer_recorder is None:
            # Keep the loader's choice (SDPA or sliced attention); only undo an earlier install.
            processors[name] = AttnProcessor2_0() if isinstance(current, XDreamerAttnProcessor) else current
        else:
            processors[name] = XDreamerAttnProcessor(lora if adapters is not None else None, adapters, layer_recorder)
    unet.set_attn_processor(processors)
    unet.requires_grad_(False)


def remove_attention_processors(unet: nn.Module) -> None:
    """Put diffusers' default AttnProcessor2_0 back wherever an XDreamerAttnProcessor was installed."""
    unet.set_attn_processor(
        {
            name: AttnProcessor2_0() if isinstance(current, XDreamerAttnProcessor) else current
            for name, current in unet.attn_processors.items()
        }
    )


class CGLoRAOptimizer:
    """The adapters' optimizer: a torch optimizer whose `step()` first rescales the gradient.

    kind "normalized_sgd" (default): SGD on the gradient rescaled to norm `max_grad_norm`, a step
        of length lr * max_grad_norm whatever the gradient's size. This is what the authors'
        SGD(lr 1e-5) + clip_grad_norm_(5) does in their training script: it runs on gradients still
        multiplied by the mixed-precision GradScaler (x65536 at the start; `scaler.step` is called
        only for the mesh and material optimizers), whose norm always exceeds the clip, so every
        step has length 5e-5. Plain SGD 1e-5 on unscaled gradients barely moves the adapters.
    kind "sgd": SGD with the gradient norm clipped at `max_grad_norm` (the authors' optimizer on
        unscaled gradients); "adamw": AdamW, gradient norm clipped likewise.
    A zero gradient is no step for every kind."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, max_grad_norm: float | None):
        self.optimizer = optimizer
        self.kind = kind
        self.max_grad_norm = max_grad_norm

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> float | None:
        """Rescale (normalize or clip, as configured) then step; returns the gradient norm before
        rescaling, None when no parameter has a gradient."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return None
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if norm == 0.0:
            return norm
        if self.kind == "normalized_sgd":
            factor = self.max_grad_norm / norm
        elif self.max_grad_norm is not None and norm > self.max_grad_norm:
            factor = self.max_grad_norm / (norm + 1e-6)  # clip_grad_norm_'s rule
        else:
            factor = 1.0
        if factor != 1.0:
            for g in grads:
                g.mul_(factor)
        self.optimizer.step()
        return norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def make_cg_lora_optimizer(
    params, kind: str = "normalized_sgd", lr: float | None = None, max_grad_norm: float | None = 5.0
) -> CGLoRAOptimizer:
    """The CG-LoRA optimizer (see `CGLoRAOptimizer`). Default learning rates: 1e-5 for the SGD
    kinds (the authors'), 1e-4 for AdamW; `max_grad_norm` 5 (the authors')."""
    params = list(params)
    if kind not in OPTIMIZERS:
        raise CGLoRAError(f"CG-LoRA optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if kind == "normalized_sgd" and not (max_grad_norm and max_grad_norm > 0):
        raise CGLoRAError("the normalized_sgd CG-LoRA optimizer needs a positive max_grad_norm (its step length / lr)")
    if kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4 if lr is None else lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(params, lr=1e-5 if lr is None else lr)
    return CGLoRAOptimizer(optimizer, kind, max_grad_norm)
