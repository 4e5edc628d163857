"""The diffusers reference for the flow-matching families: each family's own pipeline, run on the tiny
transformer with the card's scheduler config, fed the conditioning directly (tiny_flow_models.conditioning).

FluxPipeline / FluxImg2ImgPipeline, StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline,
QwenImagePipeline / QwenImageImg2ImgPipeline and ZImagePipeline / ZImageImg2ImgPipeline do their own σ
set-up (sigmas, μ from the image tokens, get_timesteps for `strength`), noise (a CPU generator seeded with
the seed: the same draws as ComfyUI's prepare_noise) and Euler steps; they return latents with
output_type="latent", in the space the transformer samples, which is ComfyUI's latent_format.process_in of
its LATENT: (z − shift)·scale for FLUX, SD3 and Z-Image (ComfyUI: Flux/SD3 latent formats), the per-channel
(z − mean)/std of Qwen-Image's VAE (ComfyUI: Wan21). FLUX's and Qwen-Image's packed 2×2 latents are
unpacked back to the layout ComfyUI keeps (its models patchify inside): (1, 16, h, w), and for Qwen-Image
(1, 16, 1, h, w), the 5-D video-VAE latent both sides use (ComfyUI's Wan21 format is 3-D: the sampler
gives an image latent its frame axis).
"""
from __future__ import annotations

import torch

import pack  # noqa: F401 — registers `comfyui_fewstep`
from comfyui_fewstep.fewstep.families import get_family
from tiny_flow_models import BASES, TinyFlowModel, conditioning

# Every flow family with the tiny stand-in for its base.
FAMILY_BASES = {
    "flux_schnell": "flux_schnell",
    "flux_turbo_alpha": "flux_dev",
    "hyper_flux": "flux_dev",
    "sd35_large_turbo": "sd35_large",
    "qwen_image_lightning": "qwen_image",
    "z_image_turbo": "z_image",
}
LATENT_SIZES = [(8, 8), (16, 8)]  # latent (height, width): 64×64 and 128×64 px, 16 and 32 image tokens



def sampling_key(family_name: str, steps: int, denoise: float, latent_size) -> tuple:
    """Everything a parity run depends on besides the family's name: two families equal here sample
    the same transformer with the same σ, guidance and noise (FLUX.1-Turbo-Alpha and Hyper-FLUX at 8
    steps: the same FLUX.1-dev scheduler and guidance 3.5; their LoRAs differ, and the LoRAs are not
    part of these runs)."""
    family = get_family(family_name)
    config = tuple(sorted(family.scheduler_overrides.items()))
    return (FAMILY_BASES[family_name], config, family.flow.sigma_rule, family.flow.guidance, steps, denoise,
            latent_size)


# The parity grid: each family × its published step counts × text-to-image and img2img at 0.5 × both
# sizes, through Few-Step Scheduler + Sampler in SamplerCustom, a case run once where an earlier family's
# case has the same sampling_key (SHARED_CASES lists them; test_flow_parity checks that their σ are
# equal); then through Few-Step KSampler (one node, the family's guidance its own) at each family's
# default steps, text-to-image at one size and img2img at the other. Grouped by base so one tiny
# transformer is in memory at a time.
ROUTES = ("SamplerCustom", "FewStepKSampler")
PARITY_GRID, SHARED_CASES, _seen = [], [], {}
for _family in FAMILY_BASES:
    for _steps in get_family(_family).flow.published_steps:
        for _denoise in (1.0, 0.5):
            for _size in LATENT_SIZES:
                _case = (_family, _steps, _denoise, _size)
                _key = sampling_key(*_case)
                if _key in _seen:
                    SHARED_CASES.append((_case, _seen[_key]))
                else:
                    _seen[_key] = _case
                    PARITY_GRID.append((*_case, "SamplerCustom"))
for _family in FAMILY_BASES:
    _steps = get_family(_family).default_steps
    PARITY_GRID += [(_family, _steps, 1.0, LATENT_SIZES[0], "FewStepKSampler"),
                    (_family, _steps, 0.5, LATENT_SIZES[1], "FewStepKSampler")]
PARITY_GRID.sort(key=lambda case: list(FAMILY_BASES.values()).index(FAMILY_BASES[case[0]]))


def tiny_vae():
    """The SD3 img2img pipeline reads its VAE's latent_channels even when handed latents; the weights are
    never used (no encode or decode happens with output_type="latent" and a 16-channel image)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=16, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


class FlowReference:
    def __init__(self, tiny: TinyFlowModel):
        import diffusers

        self.tiny = tiny
        self.transformer = getattr(diffusers, BASES[tiny.base][0]).from_pretrained(
            str(tiny.transformer_dir), torch_dtype=torch.float32).eval()

    def _pipeline(self, family, img2img: bool):
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(family.scheduler_overrides))
        if self.tiny.base.startswith("flux"):
            pipeline_class = diffusers.FluxImg2ImgPipeline if img2img else diffusers.FluxPipeline
            pipe = pipeline_class(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=self.transformer)
        elif self.tiny.base == "qwen_image":
            pipeline_class = diffusers.QwenImageImg2ImgPipeline if img2img else diffusers.QwenImagePipeline
            pipe = pipeline_class(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                  transformer=self.transformer)
        elif self.tiny.base == "z_image":
            pipeline_class = diffusers.ZImageImg2ImgPipeline if img2img else diffusers.ZImagePipeline
            pipe = pipeline_class(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                  transformer=self.transformer)
            # Without a VAE, ZImageImg2ImgPipeline's image processor takes only 4-channel tensors for
            # latents; told the VAE's 16 channels (as QwenImageImg2ImgPipeline's is), it passes the
            # image latent through to prepare_latents, which uses a 16-channel `image` as the latent.
            pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2,
                                                     vae_latent_channels=self.transformer.config.in_channels)
        else:
            pipeline_class = diffusers.StableDiffusion3Img2ImgPipeline if img2img else diffusers.StableDiffusion3Pipeline
            pipe = pipeline_class(transformer=self.transformer, scheduler=scheduler, vae=tiny_vae(),
                                  text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(self, family_name: str, steps: int, denoise: float, latent_size: tuple[int, int], seed: int,
               image_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Final latents of the family's pipeline, in ComfyUI's layout (above); `image_latent` in the same
        (processed) space, (1, 16, h, w)."""
        family = get_family(family_name)
        prompt_embeds, pooled = conditioning(base=self.tiny.base)
        height, width = (side * 8 for side in latent_size)
        pipe = self._pipeline(family, img2img=image_latent is not None)
        kwargs = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=height, width=width,
                      num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      output_type="latent")
        if self.tiny.base.startswith("flux"):
            kwargs["guidance_scale"] = family.flow.guidance if family.flow.guidance is not None else 0.0
        elif self.tiny.base == "qwen_image":  # the card's true_cfg_scale 1: no negative pass; every token kept
            del kwargs["pooled_prompt_embeds"]
            kwargs.update(true_cfg_scale=1.0, prompt_embeds_mask=torch.ones(prompt_embeds.shape[:2], dtype=torch.long))
        elif self.tiny.base == "z_image":  # a list of (tokens, width) captions, no pooled embedding
            del kwargs["pooled_prompt_embeds"]
            kwargs.update(prompt_embeds=list(prompt_embeds), guidance_scale=0.0)
        else:
            kwargs["guidance_scale"] = 0.0  # the card's: no classifier-free guidance
        if image_latent is not None:
            kwargs.update(image=image_latent, strength=denoise)
        with torch.no_grad():
            latents = pipe(**kwargs).images
        if self.tiny.base.startswith("flux") or self.tiny.base == "qwen_image":
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return latents
