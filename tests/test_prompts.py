"""Direction-aware prompts, text embedding cache, end-of-text index and text features."""

import pytest
import torch
from tiny_models import make_tiny_sd

from xdreamer.guidance.loader import load_guidance_model
from xdreamer.guidance.prompts import (
    PromptError,
    TextConditioner,
    direction_prompt,
    direction_prompts,
)
from xdreamer.render.camera import spherical_cameras


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_guidance_model(str(make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd2", "sd2")), "cpu")


def test_direction_suffixes_from_camera_angles():
    elevation = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0, 70.0, 59.0])
    azimuth = torch.tensor([0.0, 44.0, 90.0, -100.0, 180.0, 0.0, 200.0])
    cameras = spherical_cameras(elevation, azimuth, torch.full((7,), 3.0), torch.full((7,), 0.7))
    assert direction_prompts("a red chair", cameras) == [
        "a red chair, front view",
        "a red chair, front view",
        "a red chair, side view",
        "a red chair, side view",
        "a red chair, back view",
        "a red chair, overhead view",
        "a red chair, back view",
    ]
    assert direction_prompts("a red chair", cameras, overhead_elevation=50.0)[-1] == "a red chair, overhead view"
    with pytest.raises(PromptError):
        direction_prompt("a red chair", "below")


@pytest.mark.parametrize(
    "prompt, tokens",
    [("a red chair", 3), ("a red chair, side view", 6), ("a photo of a cat, front view", 8), ("zebra", 5)],
)
def test_end_of_text_index_and_feature(model, prompt, tokens):
    conditioner = TextConditioner(model)
    embedding = conditioner.encode(prompt)
    # Known words are single tokens; "zebra" is not in the tiny vocabulary and falls back to bytes.
    assert embedding.eot_index == tokens + 1
    assert embedding.embeddings.shape == (77, 32)
    assert torch.equal(embedding.text_feature, embedding.embeddings[embedding.eot_index])
    ids = model.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = model.text_encoder(ids).pooler_output[0]
    torch.testing.assert_close(embedding.text_feature, pooled, rtol=0, atol=0)
    assert not embedding.truncated


def test_truncated_prompt_warns_and_ends_with_end_of_text(model):
    conditioner = TextConditioner(model)
    with pytest.warns(UserWarning, match="truncated"):
        embedding = conditioner.encode("a red chair " * 40)
    assert embedding.truncated and embedding.eot_index == 76
    with torch.no_grad():
        ids = model.tokenizer("a red chair " * 40, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        pooled = model.text_encoder(ids).pooler_output[0]
    assert ids[0, 76] == model.tokenizer.eos_token_id
    torch.testing.assert_close(embedding.text_feature, pooled, rtol=0, atol=0)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_an_error(model, prompt):
    conditioner = TextConditioner(model)
    with pytest.raises(PromptError, match="empty"):
        conditioner.views(prompt, ["front"])
    with pytest.raises(PromptError, match="empty"):
        conditioner.prepare(prompt)
    if prompt:  # the empty string itself is the default negative prompt, which encode accepts
        with pytest.raises(PromptError, match="empty"):
            conditioner.encode(prompt)


def test_each_distinct_prompt_is_encoded_once(model):
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        conditioner = TextConditioner(model)
        first = conditioner.views("a red chair", ["front", "side", "front", "back"])
        second = conditioner.views("a red chair", ["back", "front", "side", "side"])
    finally:
        handle.remove()
    assert len(calls) == 4  # 3 direction prompts + the empty negative prompt
    assert torch.equal(first.cond[0], second.cond[1]) and torch.equal(first.cond[1], second.cond[3])


def test_view_batch_shapes_order_and_negative_prompt(model):
    conditioner = TextConditioner(model)
    batch = conditioner.views("a red chair", ["front", "side", "back", "overhead"])
    assert batch.cond.shape == batch.uncond.shape == (4, 77, 32)
    assert batch.cond_features.shape == batch.uncond_features.shape == (4, 32)
    assert batch.cond_eot.tolist() == [7, 7, 7, 7] and batch.uncond_eot.tolist() == [1, 1, 1, 1]
    empty = conditioner.encode("")
    assert empty.eot_index == 1
    assert all(torch.equal(row, empty.embeddings) for row in batch.uncond)
    assert torch.equal(batch.uncond_features[2], empty.text_feature)
    assert batch.prompts[3] == "a red chair, overhead view"
    assert torch.equal(batch.cond[1], conditioner.encode("a red chair, side view").embeddings)
    assert not torch.equal(batch.cond[0], batch.cond[1])
    assert torch.equal(batch.context_batch()[:4], batch.uncond) and torch.equal(batch.context_batch()[4:], batch.cond)
    assert batch.eot_batch().tolist() == [1] * 4 + [7] * 4
    assert torch.equal(batch.eot_indices, batch.cond_eot) and conditioner.feature_dim == 32
    assert torch.equal(conditioner("a red chair", ["side"]).cond[0], batch.cond[1])
    assert torch.equal(batch.features_batch()[4:], batch.cond_features)

    negative = TextConditioner(model, negative_prompt="a wooden table").views("a red chair", ["front"])
    assert negative.uncond_eot.tolist() == [4]
    assert torch.equal(negative.uncond[0], conditioner.encode("a wooden table").embeddings)


def test_prepared_prompts_survive_text_encoder_release(tmp_path):
    model = load_guidance_model(str(make_tiny_sd(tmp_path / "sd1", "sd1")), "cpu")
    conditioner = TextConditioner(model)
    conditioner.prepare("a red chair")
    before = conditioner.views("a red chair", ["front", "overhead"])
    model.release_text_encoder()
    after = conditioner.views("a red chair", ["front", "overhead"])
    assert torch.equal(before.cond, after.cond) and torch.equal(before.uncond_features, after.uncond_features)
    with pytest.raises(PromptError, match="released"):
        conditioner.views("a wooden table", ["front"])
