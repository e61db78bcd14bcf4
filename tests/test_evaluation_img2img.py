"""`mist.runner.evaluation.img2img` against diffusers' StableDiffusionImg2ImgPipeline on identical tiny weights and
seeds."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline

from mist.runner.evaluation.img2img import ddim_scheduler, img2img
from mist.models import TINY
from mist.models.loading import build_random

EVALUATION_PARTS = frozenset({"encoder", "unet", "text_encoder", "decoder"})


@pytest.fixture(scope="module")
def model():
    return build_random(parts=EVALUATION_PARTS)


def _diffusers_pipeline(model) -> StableDiffusionImg2ImgPipeline:
    vae = AutoencoderKL(**TINY.vae)
    vae.load_state_dict({**model.encoder.state_dict(), **model.decoder.state_dict()})
    return StableDiffusionImg2ImgPipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=model.unet,
                                          scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


@pytest.mark.parametrize(("strength", "guidance"), [(0.35, 7.5), (0.5, 1.0), (1.0, 3.0)])
def test_img2img_matches_the_diffusers_pipeline(model, strength, guidance):
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = img2img(model, image, strength, [torch.Generator().manual_seed(7)], steps=10, guidance=guidance)
    pipe = _diffusers_pipeline(model)
    theirs = pipe(prompt_embeds=model.text_embedding("a painting"),
                  negative_prompt_embeds=model.text_embedding("") if guidance > 1 else None,
                  image=(image + 1) / 2, strength=strength, num_inference_steps=10, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert ours.images.shape == (1, 3, 64, 48) and ours.latents.shape == (1, 4, 8, 6)
    torch.testing.assert_close((ours.images + 1) / 2, theirs, atol=1e-5, rtol=1e-4)


def test_same_generators_give_a_batch_the_same_noise(model):
    """Clean and protected images run as one batch with the same seed each get exactly what they get alone."""
    pictures = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    together = img2img(model, pictures, 0.5, [torch.Generator().manual_seed(5) for _ in range(2)], steps=4)
    alone = img2img(model, pictures[1:], 0.5, [torch.Generator().manual_seed(5)], steps=4)
    torch.testing.assert_close(together.latents[1:], alone.latents, atol=1e-5, rtol=1e-4)
    same = img2img(model, pictures[:1].repeat(2, 1, 1, 1), 0.5, [torch.Generator().manual_seed(5)] * 1
                   + [torch.Generator().manual_seed(5)], steps=4)
    torch.testing.assert_close(same.latents[0], same.latents[1])


def test_strength_outside_zero_to_one_is_refused(model):
    with pytest.raises(ValueError, match="strength"):
        img2img(model, torch.zeros(1, 3, 32, 32), 1.5, [torch.Generator()])
