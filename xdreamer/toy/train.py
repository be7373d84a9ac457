"""Training the embedded toy guidance model: a small pixel-space text-to-image diffusion model.

Like DeepFloyd IF (no VAE, 3-channel 32x32 images in [-1, 1]) but tiny: a UNet2DConditionModel
with cross-attention blocks, conditioned on the last hidden state of a small CLIPTextModel
trained jointly from scratch, epsilon prediction under a linear DDPM schedule (the pixel-space
DDPM one), with min-SNR-5 loss weighting. The export is a diffusers folder (unet/,
text_encoder/, tokenizer/, scheduler/, model_index.json, safetensors) that
`load_guidance_model("toy")` reads.

Layout of `out_dir`: work/ (dataset cache, checkpoint, tokenizer), model/ (the export),
loss.png, losses.json, samples.png, samples_normal.png, samples_front.png.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from xdreamer.atomic import atomic_path, write_json
from xdreamer.guidance.loader import PIXEL_MODEL_INDEX
from xdreamer.toy.dataset import ToyDataset, build_dataset
from xdreamer.toy.world import (
    COLOURS,
    CONTRAST_SHAPES,
    FRONT_SHAPES,
    HELD_OUT,
    HELD_OUT_OBJECTS,
    SHAPES,
    ToyObject,
    ToyWorldError,
    caption,
    caption_words,
    front_objects,
)

RESOLUTION = 32  # the shipped model's image side
TEXT_DIM = 64
CAPTION_DROPOUT = 0.1  # empty caption, for classifier-free guidance
VIEW_SUFFIX_PROBABILITY = 0.75  # otherwise the caption has no ", front view" suffix
# Bumped whenever the world or the rendering changes, so a cached dataset is never reused stale
# (2: objects with a front, ", normal map" captions; 3: every object seen from above one time in
# eight, `dataset.is_overhead`; 4: boxes, `world.CONTRAST_SHAPES`).
DATASET_VERSION = 4


@dataclass
class ToyTrainingConfig:
    """What a training run depends on; the defaults are the settings of the from-scratch model
    that the shipped one was trained on from (on dataset v2; docs/toy_model.md, "Training")."""

    steps: int = 15000
    batch_size: int = 16
    seed: int = 0
    dataset_size: int = 1600  # placements (20 per training object); each gives 4 views x 2 modes
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 100
    channels: tuple[int, int, int] = (32, 64, 64)  # the UNet's block widths
    # The images' side in pixels (the UNet's sample_size; the dataset is rendered at 4x it). The
    # guidance resizes every render to it, so a model of another resolution drops in with --model.
    resolution: int = RESOLUTION
    # How batches are drawn: "uniform" over the images, or "shapes" (`sampling_weights`).
    sampling: str = "uniform"
    # An exported model (`export_model`'s folder) to start from instead of random weights.
    init: str | None = None


SAMPLINGS = ("uniform", "shapes")


def sampling_weights(dataset: ToyDataset, sampling: str) -> torch.Tensor | None:
    """Per-image probabilities (N,) of being drawn into a batch, or None for uniform draws.

    "shapes": every kind of thing an image shows gets the same share of each mode. The dataset
    cycles through the training objects, and 30 of its 80 are cubes (7 plain, 23 with a front),
    so under uniform draws 38 % of the normal maps are cubes and 9 % pyramids. A normal map
    does not show colour, so a cube with a front is a cube there: normal maps are balanced over
    the shapes (mug and box included). Shaded renders show the front, so the cubes with a front
    are a kind of their own there."""
    if sampling == "uniform":
        return None
    if sampling != "shapes":
        raise ToyWorldError(f"unknown sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    mode = dataset.normal_map.long()
    kind = (dataset.shape * 2 + ((dataset.front >= 0) & ~dataset.normal_map).long()) * 2 + mode
    counts = torch.bincount(kind)
    kinds_per_mode = torch.stack([(counts[m::2] > 0).sum() for m in (0, 1)])  # (2,): shaded, normal
    # Each mode half of the draws, shared equally by its kinds, an image 1 / (its kind's count).
    weights = 1.0 / (counts[kind].double() * kinds_per_mode[mode])
    return weights / weights.sum()


def make_scheduler():
    """The DDPM noise schedule: 1000 steps, linear betas 1e-4 .. 0.02, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def make_unet(channels: tuple[int, int, int] = ToyTrainingConfig.channels, resolution: int = RESOLUTION):
    """UNet2DConditionModel on (3, resolution, resolution), 32 for the shipped model: block
    widths `channels`, cross-attention at 1/2 and 1/4 of the resolution (down and up) and in the
    middle block, 4 heads, text width 64."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def make_text_encoder(tokenizer):
    """A 2-layer CLIPTextModel of width 64 over the toy tokenizer's vocabulary, 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B,) captions -> (B, 77) token ids padded with end-of-text, as the guidance loader does."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """(B,) captions -> (B, 77, 64) last hidden states, the UNet's cross-attention context."""
    return text_encoder(tokenize(tokenizer, captions).to(text_encoder.device)).last_hidden_state


def random_captions(dataset: ToyDataset, index: torch.Tensor, generator: torch.Generator) -> list[str]:
    """Captions for a batch: empty with probability CAPTION_DROPOUT, else with a view suffix
    with probability VIEW_SUFFIX_PROBABILITY."""
    u = torch.rand(len(index), 2, generator=generator)
    captions = []
    for i, (drop, suffix) in zip(index.tolist(), u.tolist()):
        if drop < CAPTION_DROPOUT:
            captions.append("")
        else:
            captions.append(dataset.caption(i, with_view=suffix < VIEW_SUFFIX_PROBABILITY))
    return captions


def _lr_factor(step: int, config: ToyTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _update_ema(ema: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], step: int, decay: float) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # short warm-up: early EMA follows the weights
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                ema[f"{name}.{key}"].lerp_(value, 1 - decay)


@torch.no_grad()
def sample(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    captions: list[str],
    generator: torch.Generator,
    guidance_scale: float = 4.0,
    steps: int = 25,
) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance: (B,) captions -> (B, 32, 32, 3) in [0, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    size = unet.config.sample_size
    context = encode_text(text_encoder, tokenizer, captions + [""] * len(captions)).to(unet.device)
    # Noise drawn on the CPU: the same seed gives the same samples on any device.
    x = torch.randn(len(captions), 3, size, size, generator=generator).to(unet.device)
    for t in ddim.timesteps:
        eps_cond, eps_uncond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = ddim.step(eps, t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()


def export_model(out_dir: Path, unet, text_encoder, tokenizer_dir: Path, scheduler) -> Path:
    """Write the diffusers folder (safetensors) to `out_dir` atomically: built beside it, then
    swapped in."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    write_json(tmp / "model_index.json", PIXEL_MODEL_INDEX)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir


def save_loss_curve(path: Path, losses: list[float], width: int = 640, height: int = 360) -> None:
    """PNG of the training loss (log scale): raw per step in light gray, 50-step mean in blue."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-8))
    window = min(50, len(values))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    lo, hi = math.floor(values.min() * 2) / 2, math.ceil(values.max() * 2) / 2
    hi = max(hi, lo + 0.5)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * i / max(1, len(values) - 1)
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

    draw.rectangle([left, top, right, bottom], outline="black")
    for tick in np.arange(lo, hi + 1e-9, 0.5):
        y = xy(0, tick)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{10 ** tick:.3g}", fill="black")
    draw.text((left, bottom + 8), f"step 0 .. {len(values)}   loss (min-SNR-weighted epsilon MSE), log scale", fill="black")
    draw.line([xy(i, v) for i, v in enumerate(values)], fill=(200, 200, 200))
    draw.line([xy(i + window - 1, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
    with atomic_path(path) as tmp:
        image.save(tmp)


def save_sample_grid(path: Path, images: torch.Tensor, rows: int, columns: int, marked: list[int], scale: int = 3) -> None:
    """PNG grid of (rows * columns, H, W, 3) images, upscaled `scale` x; images whose index is in
    `marked` (held-out pairs) get a white frame."""
    from PIL import Image

    h, w = images.shape[1:3]
    pad = 2
    grid = np.zeros((rows * (h + 2 * pad), columns * (w + 2 * pad), 3), dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for k in range(rows * columns):
        r, c = divmod(k, columns)
        y, x = r * (h + 2 * pad), c * (w + 2 * pad)
        if k in marked:
            grid[y : y + h + 2 * pad, x : x + w + 2 * pad] = 255
        grid[y + pad : y + pad + h, x + pad : x + pad + w] = pixels[k]
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp)


def grid_shapes(normal_map: bool = False) -> tuple[str, ...]:
    """The rows of `grid_captions`."""
    return SHAPES + CONTRAST_SHAPES + (FRONT_SHAPES if normal_map else ())


def grid_captions(samples_per_pair: int = 1, normal_map: bool = False) -> tuple[list[str], list[int]]:
    """Captions for the sample grid: one row per shape, the box after the primitives (the mug
    last when `normal_map`), `samples_per_pair` columns per colour (held-out pairs included), and
    the indices of the held-out cells. `normal_map` asks for the normal-map mode (", normal map")."""
    captions, held_out = [], []
    for shape in grid_shapes(normal_map):
        for colour in COLOURS:
            for _ in range(samples_per_pair):
                if (shape, colour) in HELD_OUT or ToyObject(shape, colour) in HELD_OUT_OBJECTS:
                    held_out.append(len(captions))
                captions.append(caption(shape, colour, normal_map=normal_map))
    return captions, held_out


def front_grid_captions() -> tuple[list[str], list[int]]:
    """Captions for the grid of objects with a front: one row per view (front, side, back), one
    column per object of `front_objects()`, and the indices of the held-out cells."""
    objects = front_objects()
    captions, held_out = [], []
    for view in ("front", "side", "back"):
        for thing in objects:
            if thing in HELD_OUT_OBJECTS:
                held_out.append(len(captions))
            captions.append(thing.caption(view))
    return captions, held_out


def save_samples(out_dir: Path, unet, text_encoder, tokenizer, scheduler, seed: int) -> None:
    """samples.png (shaded primitives), samples_normal.png (", normal map" captions) and
    samples_front.png (objects with a front from the front, side and back): one DDIM sample
    (25 steps, guidance 4, `seed`) per caption, held-out cells framed in white."""
    grids = {
        "samples.png": (grid_captions(), len(grid_shapes())),
        "samples_normal.png": (grid_captions(normal_map=True), len(grid_shapes(normal_map=True))),
        "samples_front.png": (front_grid_captions(), 3),
    }
    for name, ((captions, held_out), rows) in grids.items():
        images = sample(unet, text_encoder, tokenizer, scheduler, captions, torch.Generator().manual_seed(seed))
        save_sample_grid(out_dir / name, images, rows, len(captions) // rows, held_out)


TOKEN_EMBEDDING = "embeddings.token_embedding.weight"  # in CLIPTextModel's state_dict


def carry_token_embeddings(state: dict[str, torch.Tensor], old_vocab: dict[str, int], new_vocab: dict[str, int],
                           fresh: torch.Tensor) -> dict[str, torch.Tensor]:
    """A text encoder's weights `state` with its token embedding (len(old_vocab), D) re-indexed
    for `new_vocab` (token -> id): each token keeps its row, tokens new to the vocabulary take
    their row of `fresh` (len(new_vocab), D), the new model's own initialization."""
    old = state[TOKEN_EMBEDDING]
    rows = fresh.clone()
    for token, index in new_vocab.items():
        if token in old_vocab:
            rows[index] = old[old_vocab[token]]
    return {**state, TOKEN_EMBEDDING: rows}


def load_exported_weights(model_dir: Path, unet, text_encoder, tokenizer=None) -> None:
    """Load an exported toy model's UNet and text encoder weights (safetensors) into `unet` and
    `text_encoder`, which must have its architecture. Given the `tokenizer` being trained with,
    the token embedding is matched to it by token (`carry_token_embeddings`), so a world with a
    new caption word trains on from a model that did not know it."""
    from safetensors.torch import load_file

    files = {"unet": model_dir / "unet" / "diffusion_pytorch_model.safetensors",
             "text_encoder": model_dir / "text_encoder" / "model.safetensors"}
    vocab_file = model_dir / "tokenizer" / "vocab.json"
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        if not files[name].is_file():
            raise ToyWorldError(f"--init {model_dir}: not an exported toy model (no {files[name].relative_to(model_dir)})")
        state = load_file(files[name])
        own = module.state_dict()
        if name == "text_encoder" and tokenizer is not None and vocab_file.is_file() and TOKEN_EMBEDDING in state:
            old_vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            if len(old_vocab) == state[TOKEN_EMBEDDING].shape[0]:
                state = carry_token_embeddings(state, old_vocab, tokenizer.get_vocab(), own[TOKEN_EMBEDDING])
        if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
            raise ToyWorldError(f"--init {model_dir}: its {name} is not this configuration's architecture")
        module.load_state_dict(state)


def _load_or_build_dataset(work: Path, config: ToyTrainingConfig, progress: bool) -> ToyDataset:
    path = work / f"dataset_v{DATASET_VERSION}_{config.dataset_size}_{config.resolution}_seed{config.seed}.pt"
    if path.is_file():
        return ToyDataset.load(path)
    dataset = build_dataset(
        config.dataset_size, config.resolution, torch.Generator().manual_seed(config.seed), progress=progress
    )
    dataset.save(path)
    return dataset


def train_toy_model(
    out_dir: str | Path,
    config: ToyTrainingConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    num_threads: int | None = None,
    device: str = "cpu",
) -> Path:
    """Render (once, cached) the toy dataset, train the toy model, export it to out_dir/model.

    `config` defaults to the shipped model's settings. Resumes from out_dir/work/checkpoint.pt
    when `resume`; a checkpoint of other settings stops it with a ToyWorldError before anything
    is written. Writes loss.png, losses.json and the sample grids (`save_samples`) next to the
    export. `num_threads` sets torch's CPU threads (1 is fastest on a busy machine). `device`:
    where the model trains; every random draw stays on the CPU generator, so a GPU run follows
    the same data and noise. Returns the export's path."""
    from tqdm import tqdm

    from xdreamer.guidance.tokenizer import build_clip_tokenizer

    config = ToyTrainingConfig() if config is None else config
    if config.steps < 1 or config.batch_size < 1 or config.dataset_size < 1:
        raise ToyWorldError("steps, batch_size and dataset_size must be positive")
    if not config.lr > 0:
        raise ToyWorldError(f"--lr {config.lr}: must be positive")
    if config.sampling not in SAMPLINGS:
        raise ToyWorldError(f"--sampling {config.sampling}: use one of {', '.join(SAMPLINGS)}")
    if config.init is not None and not Path(config.init).is_dir():
        raise ToyWorldError(f"--init {config.init}: no such folder")
    # Two downsamplings, and 8 groups in every normalization layer.
    if config.resolution < 8 or config.resolution % 4:
        raise ToyWorldError(f"--resolution {config.resolution}: must be a multiple of 4, at least 8")
    if len(config.channels) != 3 or any(c < 8 or c % 8 for c in config.channels):
        raise ToyWorldError(
            f"--channels {','.join(map(str, config.channels))}: give three block widths, each a multiple of 8"
        )
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise ToyWorldError(f"--device {device}: not a device (cpu, cuda, cuda:1)") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ToyWorldError(f"--device {device}: this machine has no CUDA device")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    steps, batch_size, seed = config.steps, config.batch_size, config.seed
    out_dir = Path(out_dir)
    work = out_dir / "work"
    checkpoint_path = work / "checkpoint.pt"
    state = None
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False, map_location=device)
        # Fields added since the checkpoint was written count at their defaults, which it ran with.
        saved = {**asdict(ToyTrainingConfig()), **state["config"]}
        changed = [f"{k} {saved[k]!r} there, {v!r} here" for k, v in asdict(config).items() if saved[k] != v]
        if changed:
            raise ToyWorldError(
                f"{checkpoint_path} is a run with other settings ({'; '.join(changed)}): give another --out, "
                "or delete it to start over"
            )
    work.mkdir(parents=True, exist_ok=True)

    dataset = _load_or_build_dataset(work, config, progress)
    tokenizer = build_clip_tokenizer(work / "tokenizer", caption_words())
    scheduler = make_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.float().to(device)
    # Weight initialization draws from torch's global generator: seed it without leaking state.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = make_unet(config.channels, config.resolution).to(device)
        text_encoder = make_text_encoder(tokenizer).to(device)
    if config.init is not None:
        load_exported_weights(Path(config.init), unet, text_encoder, tokenizer)
    weights = sampling_weights(dataset, config.sampling)
    modules = {"unet": unet, "text_encoder": text_encoder}
    parameters = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
    ema = {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    start = 0

    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
        generator.set_state(state["generator"].cpu())
        losses, start = state["losses"], state["step"]

    def save_checkpoint(step: int) -> None:
        state = {name: module.state_dict() for name, module in modules.items()}
        state.update(
            optimizer=optimizer.state_dict(), ema=ema, generator=generator.get_state(), losses=losses, step=step,
            config=asdict(config),
        )
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)

    for module in modules.values():
        module.train()
    began = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="training toy model", disable=not progress)
    for step in bar:
        if weights is None:
            index = torch.randint(len(dataset), (batch_size,), generator=generator)
        else:
            index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        x0 = (dataset.images[index].permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)
        captions = random_captions(dataset, index, generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = encode_text(text_encoder, tokenizer, captions)
        error = (unet(x_t, t, encoder_hidden_states=context).sample - noise).pow(2).mean(dim=(1, 2, 3))
        # Min-SNR weighting (Hang et al. 2023): the nearly clean steps, which only refine
        # detail, stop dominating, so shape and colour (set at higher noise) are learned sooner.
        snr = a.view(-1) / (1 - a.view(-1))
        loss = (error * snr.clamp(max=config.min_snr_gamma) / snr).mean()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        _update_ema(ema, modules, step, config.ema_decay)
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(step + 1)

    # The export carries the EMA weights.
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in ema.items() if k.startswith(name + ".")})
        module.eval()
    model_dir = export_model(out_dir / "model", unet, text_encoder, work / "tokenizer", scheduler)
    write_json(
        out_dir / "losses.json",
        {"config": asdict(config), "losses": losses, "train_seconds_this_session": time.time() - began},
    )
    save_loss_curve(out_dir / "loss.png", losses)
    save_samples(out_dir, unet, text_encoder, tokenizer, scheduler, seed)
    return model_dir


def model_size_bytes(model_dir: str | Path) -> int:
    """Total size of the files in an exported model folder."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())


def parse_channels(text: str) -> tuple[int, ...]:
    """--channels "48,96,96" -> (48, 96, 96); how many and which widths `train_toy_model` checks."""
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise ToyWorldError(f"--channels {text}: give three block widths, e.g. 48,96,96") from None


def main(out_dir: str | Path, device: str = "cpu", **settings) -> Path:
    """`xdreamer toy train`: train with the shipped model's settings except those given
    (`ToyTrainingConfig` fields; None keeps the default), on `device`."""
    config = replace(ToyTrainingConfig(), **{k: v for k, v in settings.items() if v is not None})
    return train_toy_model(out_dir, config, device=device)
