"""Direction-aware prompts and their CLIP text embeddings.

Each view is guided by "{prompt}, {front|side|back|overhead} view" (the label comes from the
camera's azimuth and elevation, `Cameras.view_labels`). A `TextConditioner` embeds each distinct
prompt once and keeps, per prompt, the token embeddings (L, D) the UNet cross-attends to, the
index of the end-of-text token, and the final hidden state there: the text feature f_t that
CG-LoRA consumes and whose key AMA reads. The unconditional branch uses the negative prompt
(empty by default), its feature included.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from xdreamer.guidance.loader import GuidanceModel
from xdreamer.render.camera import Cameras

VIEW_LABELS = ("front", "side", "back", "overhead")


class PromptError(ValueError):
    """A prompt that cannot be used (one-line message)."""


def direction_prompt(prompt: str, label: str) -> str:
    """"{prompt}, {label} view" for a label in VIEW_LABELS."""
    if label not in VIEW_LABELS:
        raise PromptError(f"unknown view label {label!r}; expected one of {', '.join(VIEW_LABELS)}")
    return f"{prompt.strip()}, {label} view"


def direction_prompts(prompt: str, cameras: Cameras, overhead_elevation: float = 60.0) -> list[str]:
    """One direction-aware prompt per camera (front / side / back from azimuth with 45° sectors,
    overhead above `overhead_elevation` degrees)."""
    return [direction_prompt(prompt, label) for label in cameras.view_labels(overhead_elevation)]


@dataclass
class TextEmbedding:
    """One prompt through the text encoder.

    embeddings: (L, D) final hidden states of all L context tokens; eot_index: position of the
    end-of-text token; text_feature: (D,) = embeddings[eot_index]; truncated: the prompt was cut."""

    embeddings: torch.Tensor
    eot_index: int
    text_feature: torch.Tensor
    truncated: bool


@dataclass
class ViewConditioning:
    """Text conditioning of a batch of B views.

    cond, uncond: (B, L, D); cond_features, uncond_features: (B, D);
    cond_eot, uncond_eot: (B,) int64 end-of-text indices; prompts: the B direction-aware prompts.
    The `*_batch` methods stack them in the UNet's batch order [uncond; cond] (2B), the order
    `score_distillation` uses."""

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_features: torch.Tensor
    uncond_features: torch.Tensor
    cond_eot: torch.Tensor
    uncond_eot: torch.Tensor
    prompts: list[str]

    @property
    def eot_indices(self) -> torch.Tensor:
        """(B,) end-of-text indices of the conditional prompts, the tokens AMA reads."""
        return self.cond_eot

    def context_batch(self) -> torch.Tensor:
        """(2B, L, D) encoder hidden states, unconditional first."""
        return torch.cat([self.uncond, self.cond])

    def features_batch(self) -> torch.Tensor:
        """(2B, D) text features, unconditional first."""
        return torch.cat([self.uncond_features, self.cond_features])

    def eot_batch(self) -> torch.Tensor:
        """(2B,) end-of-text indices, unconditional first."""
        return torch.cat([self.uncond_eot, self.cond_eot])


class TextConditioner:
    """Embeds prompts with the guidance model's CLIP text encoder, once per distinct prompt."""

    def __init__(self, model: GuidanceModel, negative_prompt: str = ""):
        self.model = model
        self.negative_prompt = negative_prompt
        self._cache: dict[str, TextEmbedding] = {}
        self.feature_dim: int = model.text_encoder.config.hidden_size

    @property
    def context_length(self) -> int:
        limit = self.model.tokenizer.model_max_length
        if self.model.text_encoder is not None:
            limit = min(limit, self.model.text_encoder.config.max_position_embeddings)
        return limit

    def encode(self, prompt: str) -> TextEmbedding:
        """The embedding of one prompt (the negative prompt may be empty, others may not)."""
        if prompt in self._cache:
            return self._cache[prompt]
        if prompt != self.negative_prompt and not prompt.strip():
            raise PromptError("the prompt is empty; describe the object to generate, e.g. 'a red chair'")
        if self.model.text_encoder is None:
            raise PromptError(f"prompt {prompt!r} was not embedded before the text encoder was released")
        tokenizer = self.model.tokenizer
        length = self.context_length
        full = tokenizer(prompt, truncation=False).input_ids
        truncated = len(full) > length
        if truncated:
            warnings.warn(
                f"prompt is {len(full)} tokens, longer than the text encoder's {length}; "
                f"it is truncated to {tokenizer.decode(full[1 : length - 1])!r}",
                stacklevel=2,
            )
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids = ids.input_ids[0]
        # The first end-of-text token ends the prompt; padding may reuse the same id (SD 1.x),
        # so neither the last occurrence nor the argmax of a custom vocabulary is right.
        eot_index = int((ids == tokenizer.eos_token_id).nonzero()[0, 0])
        encoder = self.model.text_encoder
        with torch.no_grad():
            hidden = encoder(ids[None].to(encoder.device)).last_hidden_state[0]
        hidden = hidden.to(self.model.device, self.model.dtype)
        embedding = TextEmbedding(hidden, eot_index, hidden[eot_index], truncated)
        self._cache[prompt] = embedding
        return embedding

    def prepare(self, prompt: str, labels: tuple[str, ...] | None = VIEW_LABELS) -> None:
        """Embed every direction-aware prompt (the prompt alone when `labels` is None) and the
        negative prompt, so that the text encoder can be released afterwards."""
        if not prompt.strip():
            raise PromptError("the prompt is empty; describe the object to generate, e.g. 'a red chair'")
        self.encode(self.negative_prompt)
        for label in labels if labels is not None else [None]:
            self.encode(prompt.strip() if label is None else direction_prompt(prompt, label))

    def views(self, prompt: str, labels: list[str | None]) -> ViewConditioning:
        """Conditioning for B views of `prompt`, one view label each (None: the prompt alone,
        without a direction)."""
        if not prompt.strip():
            raise PromptError("the prompt is empty; describe the object to generate, e.g. 'a red chair'")
        prompts = [prompt.strip() if label is None else direction_prompt(prompt, label) for label in labels]
        cond = [self.encode(p) for p in prompts]
        uncond = [self.encode(self.negative_prompt)] * len(prompts)

        def stack(items: list[TextEmbedding]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            eot = torch.tensor([item.eot_index for item in items], device=self.model.device)
            return (
                torch.stack([item.embeddings for item in items]),
                torch.stack([item.text_feature for item in items]),
                eot,
            )

        cond_h, cond_f, cond_eot = stack(cond)
        uncond_h, uncond_f, uncond_eot = stack(uncond)
        return ViewConditioning(cond_h, uncond_h, cond_f, uncond_f, cond_eot, uncond_eot, prompts)

    __call__ = views

    def cameras(self, prompt: str, cameras: Cameras, overhead_elevation: float = 60.0) -> ViewConditioning:
        """Conditioning for a batch of cameras, each with its direction-aware prompt."""
        return self.views(prompt, cameras.view_labels(overhead_elevation))
