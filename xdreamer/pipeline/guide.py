"""One guidance step: score distillation (+ AMA) of a batch of renders through the frozen diffusion
model, with the direction-aware prompts, CG-LoRA's camera condition, the attention recorder and the
attention-mask alignment diagnostic. The stages call it; it knows nothing about meshes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from xdreamer.distributed import DataParallel
from xdreamer.guidance.ama import AttentionRecorder, ama_loss, attention_mask_iou
from xdreamer.guidance.cg_lora import CameraGuidedLoRA, CameraMLP, install_attention_processors, make_cg_lora_optimizer
from xdreamer.guidance.loader import GuidanceModel
from xdreamer.guidance.prompts import VIEW_LABELS, TextConditioner
from xdreamer.guidance.sds import TimestepSchedule, score_distillation
from xdreamer.pipeline.state import part_seed, seeded
from xdreamer.render.camera import Cameras


@dataclass
class GuideOutput:
    """losses: "sds", "ama" (when on) and "total" = sds + ama.weight * ama, scalar tensors;
    skipped: the SDS gradient was not finite and was zeroed; maps: the recorded attention maps,
    each (B, h, w), when recorded; alignment: {map side: IoU} when measured. The rest, detached,
    is what `denoised` needs: the model input x (B, C, h, w), the noise ε added to it, the
    unconditional and conditional predictions ε̂_u (None when the step skipped it: guidance
    scale 1 without `keep_uncond`), ε̂_c, and each view's ᾱ_t (B,)."""

    losses: dict[str, torch.Tensor]
    skipped: bool
    maps: list[torch.Tensor] | None
    alignment: dict[int, float] | None
    model_input: torch.Tensor
    noise: torch.Tensor
    noise_uncond: torch.Tensor | None
    noise_cond: torch.Tensor
    alphas: torch.Tensor

    def denoised(self, guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) the model's prediction of the clean input at `guidance_scale`:
        x + sqrt((1 - ᾱ_t) / ᾱ_t) (ε - ε̂), ε̂ = ε̂_u + s (ε̂_c - ε̂_u) (at the SDS step's own scale,
        what SDS pulls the render toward)."""
        if self.noise_uncond is None:
            raise ValueError("denoised needs the unconditional prediction: run the step with keep_uncond=True")
        prediction = self.noise_uncond + guidance_scale * (self.noise_cond - self.noise_uncond)
        alpha = self.alphas.view(-1, 1, 1, 1)
        return self.model_input + ((1.0 - alpha) / alpha).sqrt() * (self.noise - prediction)


class GuidanceStep:
    """The guidance side of a run: prompts, CG-LoRA and its optimizer, the AMA recorder."""

    def __init__(
        self, cfg: DictConfig, guidance: GuidanceModel, device: torch.device, dp: DataParallel,
        generator: torch.Generator,
    ):
        self.cfg = cfg
        self.guidance = guidance
        self.device = device
        self.dp = dp
        self.generator = generator
        self.text = TextConditioner(guidance, negative_prompt=cfg.negative_prompt)
        # Every prompt the run can ask for is embedded now, so the text encoder's memory goes
        # back before the first step.
        for stage in ("geometry", "appearance"):
            self.text.prepare(self.prompt(stage), VIEW_LABELS if self.direction_prompts(stage) else None)
        guidance.release_text_encoder()

        self.cg_lora: CameraGuidedLoRA | None = None
        self.optimizer = None
        c = cfg.cg_lora
        if c.enabled:
            with seeded(cfg.seed, "camera_mlp"):
                camera_mlp = CameraMLP(self.text.feature_dim)
            with seeded(cfg.seed, "cg_lora"):
                self.cg_lora = CameraGuidedLoRA(
                    guidance.unet, self.text.feature_dim, rank=c.rank, targets=c.targets, scale=c.scale,
                    dropout=c.dropout, seed=part_seed(cfg.seed, "cg_lora_dropout"), camera_mlp=camera_mlp,
                    projections=tuple(c.projections),
                ).to(device)
            # The camera MLP trains with the stage's AdamW (as in the authors' code); the
            # adapters with their own optimizer.
            self.optimizer = self._make_optimizer()
            self._initial = self.cg_lora.lora_state_dict()
        # The recorder is built even without AMA: the alignment diagnostic reads its maps.
        self.recorder = AttentionRecorder(
            variant="paper" if cfg.ama.scores == "softmax" else "code", layers=cfg.ama.layers
        )
        # The recorder is wired in only for the calls that read it, so other steps pay nothing.
        self._recording = False
        install_attention_processors(guidance.unet, self.cg_lora, None)

    def _make_optimizer(self):
        c = self.cfg.cg_lora
        return make_cg_lora_optimizer(self.cg_lora.up_parameters(), kind=c.optimizer, lr=c.lr, max_grad_norm=c.grad_clip)

    def start_stage(self, stage: str) -> None:
        """Called when a stage begins: with `cg_lora.per_stage` the appearance stage starts from
        the adapters' and camera MLP's initial weights with a fresh optimizer, as the authors'
        separate appearance run does."""
        if self.cg_lora is not None and stage == "appearance" and self.cfg.cg_lora.per_stage:
            self.cg_lora.load_lora_state_dict(self._initial)
            self.optimizer = self._make_optimizer()

    def direction_prompts(self, stage: str) -> bool:
        """Whether the stage's prompts name the camera's side (`direction_prompts`, and for the
        geometry stage `geometry.direction_prompts`)."""
        return bool(self.cfg.direction_prompts) and (stage != "geometry" or bool(self.cfg.geometry.direction_prompts))

    def prompt(self, stage: str) -> str:
        """The prompt of a stage: the geometry stage's normal maps may carry `geometry.prompt_suffix`."""
        prompt = self.cfg.prompt.strip()
        return prompt + self.cfg.geometry.prompt_suffix if stage == "geometry" else prompt

    @property
    def camera_parameters(self) -> list[torch.nn.Parameter]:
        """The camera MLP's parameters (trained by the stage optimizers), [] without CG-LoRA."""
        return [] if self.cg_lora is None else list(self.cg_lora.camera_mlp.parameters())

    @property
    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.cg_lora is None else self.cg_lora.up_parameters()

    def _token_index(self, text) -> torch.Tensor:
        token = str(self.cfg.ama.token)
        if token == "eot":
            return text.cond_eot
        if token == "eot_pair":
            return torch.stack([text.cond_eot, text.uncond_eot], dim=1)
        return torch.full_like(text.cond_eot, int(token))

    def __call__(
        self,
        stage: str,
        model_input: torch.Tensor,
        cameras: Cameras,
        mask: torch.Tensor,
        t_range: tuple[float, float],
        weighting: str,
        guidance_scale: float,
        ama_on: bool,
        diagnose: bool,
        keep_uncond: bool = False,
    ) -> GuideOutput:
        """SDS (+ AMA) on one batch. model_input: (B, C, h, w) latents or pixels, differentiable;
        cameras: the B views; mask: (B, H, W, 1) coverage; ama_on: add the AMA loss (the UNet then
        runs under autograd); diagnose: measure the attention-mask alignment; keep_uncond:
        evaluate the unconditional prediction even at guidance scale 1 (`GuideOutput.denoised`
        needs it at any other scale)."""
        cfg = self.cfg
        batch = model_input.shape[0]
        labels = cameras.view_labels(cfg.camera.overhead_elevation) if self.direction_prompts(stage) else [None] * batch
        text = self.text(self.prompt(stage), labels)
        record = ama_on or diagnose
        if record != self._recording:
            install_attention_processors(self.guidance.unet, self.cg_lora, self.recorder if record else None)
            self._recording = record
        # CG-LoRA's condition for the [uncond; cond] batch of 2B, in float32 even when the UNet
        # runs in half precision.
        text_features = torch.cat([text.uncond_features, text.cond_features]).float()
        camera_features = cameras.features().to(self.device).float().repeat(2, 1)
        token_index = self._token_index(text) if record else None

        def before_unet(rows: slice) -> None:
            # Each UNet call sees its own rows of the batch (AMA runs the halves separately); the
            # recorder starts afresh, so only the last call's (conditional) rows are kept.
            if self.cg_lora is not None:
                self.cg_lora.set_condition(text_features[rows], camera_features[rows])
            if record:
                self.recorder.set_token_index(token_index)
        world = self.dp.world
        schedule = TimestepSchedule(*t_range)
        t = self.dp.own(schedule.sample(batch * world, self.generator, self.guidance.num_train_timesteps), batch)
        noise = self.dp.own(torch.randn((batch * world, *model_input.shape[1:]), generator=self.generator), batch)
        t, noise = t.to(self.device), noise.to(self.device)
        sds = score_distillation(
            self.guidance, model_input, text.cond, text.uncond, t, noise,
            guidance_scale=guidance_scale, weighting=weighting, unet_grad=ama_on, before_unet=before_unet,
            keep_uncond=keep_uncond,
        )
        losses = {"sds": sds.loss}
        total = sds.loss
        maps = self.recorder.take() if record else None
        if ama_on:
            losses["ama"] = ama_loss(maps, mask, norm=cfg.ama.norm, normalize=cfg.ama.normalize)
            total = total + cfg.ama.weight * losses["ama"]
        losses["total"] = total
        alignment = attention_mask_iou(maps, mask) if diagnose and maps else None
        return GuideOutput(
            losses, sds.skipped, maps, alignment, model_input.detach().float(), noise.float(),
            sds.noise_uncond, sds.noise_cond, self.guidance.alphas_cumprod[t],
        )

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Step the adapters (their optimizer rescales the gradient first)."""
        if self.optimizer is not None:
            self.optimizer.step()

    def state_dict(self) -> dict:
        if self.cg_lora is None:
            return {}
        return {
            "cg_lora": self.cg_lora.lora_state_dict(),
            "cg_lora_optimizer": self.optimizer.state_dict(),
            "dropout_generator": self.cg_lora.generator_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.cg_lora is None or "cg_lora" not in state:
            return
        self.cg_lora.load_lora_state_dict(state["cg_lora"])
        self.optimizer.load_state_dict(state["cg_lora_optimizer"])
        self.cg_lora.set_generator_state(state["dropout_generator"])

    def save_adapters(self, path: Path) -> None:
        """The adapters + camera MLP on their own (safetensors), for use outside xdreamer."""
        if self.cg_lora is not None:
            self.cg_lora.save(path)
