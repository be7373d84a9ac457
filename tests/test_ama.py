"""AMA: the recorded attention column equals softmax(QK^T/sqrt(d)) computed by hand, the loss has
the paper's values and gradients, the gradient reaches the latents, and the figure is written."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from tiny_models import make_tiny_sd

from xdreamer.guidance.ama import (
    AMAError,
    AttentionRecorder,
    ama_loss,
    attention_mask_iou,
    map_mask_iou,
    normalize_map,
    resize_mask,
    save_attention_visualization,
)
from xdreamer.guidance.cg_lora import XDreamerAttnProcessor, install_attention_processors


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("ama_model") / "sd1", "sd1") / "unet"


def cross_attention_case(seed: int = 0):
    """A lone diffusers cross-attention: 2 heads of 8, image tokens on a 6x6 grid, 10 text tokens;
    call batch 4 = [uncond (2); cond (2)]."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    hidden = torch.randn(4, 36, 16)
    context = torch.randn(4, 10, 12)
    return attn, hidden, context


def explicit_scores(attn, hidden, context) -> torch.Tensor:
    """(2, heads, 36, 10) Q K^T / sqrt(d) of the conditional half, computed without the processor."""
    q = attn.to_q(hidden[2:]).view(2, 36, 2, 8).transpose(1, 2)
    k = attn.to_k(context[2:]).view(2, 10, 2, 8).transpose(1, 2)
    return q @ k.transpose(-1, -2) / 8**0.5


def test_post_softmax_map_equals_explicit_softmax_column():
    attn, hidden, context = cross_attention_case()
    recorder = AttentionRecorder(variant="paper")
    recorder.set_token_index(torch.tensor([3, 7]))
    attn.set_processor(XDreamerAttnProcessor(recorder=recorder))
    with torch.no_grad():
        out = attn(hidden, context)
        probabilities = explicit_scores(attn, hidden, context).softmax(dim=-1)
    expected = torch.stack([probabilities[0, :, :, 3], probabilities[1, :, :, 7]]).mean(dim=1).view(2, 6, 6)
    (recorded,) = recorder.maps
    assert recorded.shape == (2, 6, 6)
    assert (recorded - expected).abs().max().item() <= 1e-5
    # Row-major token order: token 6*row + col is pixel (row, col), row 0 at the top.
    assert recorded[1, 2, 5].item() == pytest.approx(expected.view(2, 36)[1, 17].item(), abs=1e-6)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        assert torch.equal(attn(hidden, context), out)  # recording does not change the attention


def test_pre_softmax_variant_averages_scores_over_heads_and_token_columns():
    attn, hidden, context = cross_attention_case(1)
    recorder = AttentionRecorder(variant="code")
    recorder.set_token_index(torch.tensor([[3, 4], [7, 1]]))
    attn.set_processor(XDreamerAttnProcessor(recorder=recorder))
    with torch.no_grad():
        attn(hidden, context)
        scores = explicit_scores(attn, hidden, context)
    expected = torch.stack([scores[0][..., [3, 4]], scores[1][..., [7, 1]]]).mean(dim=(1, 3)).view(2, 6, 6)
    assert (recorder.maps[0] - expected).abs().max().item() <= 1e-5


def test_recorder_skips_self_attention_and_rejects_misuse():
    attn, hidden, context = cross_attention_case()
    recorder = AttentionRecorder()
    attn.set_processor(XDreamerAttnProcessor(recorder=recorder))
    with pytest.raises(AMAError, match="set_token_index"):
        attn(hidden, context)
    recorder.set_token_index([3, 12])
    with pytest.raises(AMAError, match="outside the 10 text tokens"):
        attn(hidden, context)
    recorder.set_token_index([3, 3, 3, 3, 3])
    with pytest.raises(AMAError, match="smaller than"):
        attn(hidden, context)
    recorder.set_token_index([3, 3])
    with pytest.raises(AMAError, match="square"):
        attn(hidden[:, :35], context)
    self_attention = Attention(query_dim=16, heads=2, dim_head=8)
    self_attention.set_processor(XDreamerAttnProcessor(recorder=recorder))
    self_attention(hidden)
    assert recorder.maps == []
    with pytest.raises(AMAError):
        AttentionRecorder(variant="softmax")


def test_last_layer_is_the_last_cross_attention_at_the_highest_resolution(unet_dir):
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500, 500])
    maps = {}
    for layers in ("all", "last"):
        unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
        recorder = AttentionRecorder(layers=layers)
        recorder.set_token_index([6])
        install_attention_processors(unet, None, recorder)
        with torch.no_grad():
            unet(latents, t, context)
        maps[layers] = recorder.take()
    # Call order: down 8x8, mid 4x4, up 8x8, up 8x8.
    assert [m.shape[-1] for m in maps["all"]] == [8, 4, 8, 8]
    assert len(maps["last"]) == 1 and torch.equal(maps["last"][0], maps["all"][-1])


def test_ama_loss_values_match_the_formula():
    attention = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # normalizes to 0, 1/3, 2/3, 1
    full = torch.ones(1, 4, 4, 1)
    assert ama_loss([attention], full, eps=0.0).item() == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4)
    assert ama_loss([attention], full, "mse", eps=0.0).item() == pytest.approx((1 + 4 / 9 + 1 / 9) / 4)
    # A mask equal to the normalized map gives zero.
    mask = (torch.tensor([[0.0, 1.0], [2.0, 3.0]]) / 3)[None, :, :, None]
    assert ama_loss([attention], mask, eps=0.0).item() == pytest.approx(0.0, abs=1e-7)
    # Resizing keeps a mask's coverage: a centred disk at 64x64 -> 8x8 has the same mean.
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disk = ((x.square() + y.square()) < 0.4).float()[None, :, :, None]
    small = resize_mask(disk, (8, 8))
    assert small.shape == (1, 8, 8)
    assert small.mean().item() == pytest.approx(disk.mean().item(), rel=0.01)
    assert small[0, 0, 0].item() == 0.0 and small[0, 3, 3].item() == 1.0
    # Averaged over layers: a perfect layer (0) and the same map upside down (|2/3| everywhere).
    two = ama_loss([attention * 5 + 2, attention.flip(1)], mask, eps=0.0)
    assert two.item() == pytest.approx((0.0 + 2 / 3) / 2)
    assert normalize_map(torch.full((1, 3, 3), 4.0)).abs().max().item() == 0.0  # eps keeps flat maps finite
    with pytest.raises(AMAError):
        ama_loss([], full)
    with pytest.raises(AMAError):
        ama_loss([attention], full, norm="l3")


def test_ama_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.rand(2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    mask = torch.rand(2, 8, 8, 1, generator=g, dtype=torch.float64)
    for norm in ("l1", "mse"):
        assert torch.autograd.gradcheck(lambda a, b: ama_loss([a, b], mask, norm), maps, eps=1e-7, atol=1e-6)


def test_ama_gradient_reaches_the_latents(unet_dir):
    """Without CG-LoRA, AMA still differentiates through the frozen UNet to its input: the autograd
    directional derivative matches a central finite difference (float64)."""
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval().double()
    recorder = AttentionRecorder()
    install_attention_processors(unet, None, recorder)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 77, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([300, 300])
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    mask = ((x.square() + y.square()) < 0.3).double()[None, :, :, None]

    def loss_of(z):
        recorder.set_token_index([4])
        unet(torch.cat([z, z]), t, context)  # [uncond; cond], the cond half is recorded
        return ama_loss(recorder.take(), mask)

    loss_of(latents).backward()
    grad = latents.grad
    assert torch.isfinite(grad).all() and grad.abs().max().item() > 1e-6
    direction = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    step = 1e-5
    with torch.no_grad():
        numeric = (loss_of(latents + step * direction) - loss_of(latents - step * direction)).item() / (2 * step)
    analytic = (grad * direction).sum().item()
    assert analytic == pytest.approx(numeric, rel=1e-4)


def test_attention_visualization_writes_the_figure_grid(tmp_path):
    render = torch.rand(2, 16, 16, 3)
    mask = (torch.rand(2, 16, 16, 1) > 0.5).float()
    maps = [torch.rand(2, 4, 4), torch.rand(2, 2, 2)]
    maps[0][1, 3, 0] = 10.0  # the brightest cell of view 1, layer 0: bottom-left
    path = save_attention_visualization(tmp_path / "attention" / "step_0001.png", render, mask, maps)
    image = iio.imread(path)
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert np.abs(image[:16, :16].astype(float) / 255 - render[0].numpy()).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(image[16:, 16:32, 0] > 127, mask[1, :, :, 0].numpy() > 0.5)
    hottest = image[16 + 14, 32 + 1]  # view 1, first map column, inside the bottom-left cell
    assert hottest.astype(int).sum() > 600  # the top of the colour scale is near white-yellow
    assert not list(tmp_path.glob("attention/.*"))  # no temporary left behind


def test_batch_normalization_uses_the_extremes_of_the_whole_batch():
    attention = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 4.0]]])
    per_sample = normalize_map(attention, eps=0.0)
    assert torch.equal(per_sample[0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(per_sample[1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    batch = normalize_map(attention, eps=0.0, per="batch")
    assert torch.equal(batch, attention / 4.0)
    full = torch.ones(2, 2, 2, 1)
    assert ama_loss([attention], full, normalize="batch", eps=0.0).item() == pytest.approx(
        (1.0 - attention / 4.0).mean().item()
    )


def test_attention_mask_iou_per_resolution():
    mask = torch.zeros(2, 8, 8, 1)
    mask[:, 2:6, 2:6] = 1.0  # a 4x4 square in the middle
    aligned = mask[..., 0] * 3.0 + 1.0  # high exactly on the object: IoU 1
    shifted = torch.roll(aligned, shifts=2, dims=2)  # moved right by half the square: IoU 1/3
    small = torch.nn.functional.interpolate(aligned[:, None], size=(4, 4), mode="area")[:, 0]
    ious = attention_mask_iou([aligned, shifted, small], mask)
    assert list(ious) == [8, 4]
    assert ious[8] == pytest.approx((1.0 + 1 / 3) / 2)
    assert ious[4] == pytest.approx(1.0)
    assert map_mask_iou(shifted, mask).tolist() == pytest.approx([1 / 3, 1 / 3])
