"""The flow-matching families' example workflows: each base loaded with ComfyUI's own loaders as ComfyUI's
examples load it, sampled by Few-Step Scheduler and Sampler in SamplerCustom (scripts/build_example_workflows.py
lays them out). Steps, cfg, FLUX.1-dev's distilled guidance and the LoRA's card scale come from
fewstep/families.py; the file names are the ones the releases publish."""
from __future__ import annotations

from comfyui_fewstep.fewstep.families import Family, get_family
from example_workflow_specs import FOX, SEED, N, Workflow, download

SIZE = 1024  # every card's example samples 1024² (Qwen-Image-Lightning's generate_with_diffusers.py too)

# FLUX.1's text encoders and VAE, as ComfyUI's Flux examples name them.
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
FLUX_DEV = "flux1-dev.safetensors"
FLUX_TEXT_ENCODERS = [
    f"`models/text_encoders/{CLIP_L}`, `models/text_encoders/{T5XXL}` — comfyanonymous/flux_text_encoders "
    "(t5xxl_fp8_e4m3fn.safetensors needs half the memory)",
    f"`models/vae/{FLUX_VAE}` — black-forest-labs/FLUX.1-schnell (ae.safetensors)",
]
FLUX_DEV_FILE = (f"`models/diffusion_models/{FLUX_DEV}` — black-forest-labs/FLUX.1-dev "
                 "(gated: accept its licence first)")
# Comfy-Org's repackaged Qwen-Image (Comfy-Org/Qwen-Image_ComfyUI, split_files/…).
QWEN_IMAGE = "qwen_image_fp8_e4m3fn.safetensors"
QWEN_TEXT_ENCODER = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_VAE = "qwen_image_vae.safetensors"
# Comfy-Org's repackaged Z-Image-Turbo (Comfy-Org/z_image_turbo, split_files/…).
Z_IMAGE_TURBO = "z_image_turbo_bf16.safetensors"
QWEN3_4B = "qwen_3_4b.safetensors"


class Loaders:
    """A base's loader nodes and where its MODEL, CLIP and VAE come from."""

    def __init__(self, nodes: list[N], model: tuple, clip: tuple, vae: tuple, files: list[str]):
        self.nodes, self.model, self.clip, self.vae, self.files = nodes, model, clip, vae, files


def unet_clip_vae(unet: str, clip: N, vae: str, files: list[str]) -> Loaders:
    """Load Diffusion Model + a text-encoder loader + Load VAE: how ComfyUI's examples load these bases."""
    return Loaders([N("unet", "UNETLoader", {"unet_name": unet, "weight_dtype": "default"}), clip,
                    N("vae", "VAELoader", {"vae_name": vae})],
                   ("unet", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), files)


def flux(unet: str, unet_file: str) -> Loaders:
    clip = N("clip", "DualCLIPLoader", {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"})
    return unet_clip_vae(unet, clip, FLUX_VAE, [unet_file, *FLUX_TEXT_ENCODERS])


def card_values(family: Family) -> dict:
    """What the workflow's widgets are set to, from the family's definition."""
    return {"steps": family.default_steps, "cfg": family.default_cfg, "guidance": family.flow.guidance,
            "lora_scale": family.flow.lora_scale}


def flow_workflow(name: str, family_name: str, title: str, card: str, loaders: Loaders,
                  lora: tuple[str, str] | None = None) -> Workflow:
    """`loaders`' base (with `lora`: (file name, where to get it) through Few-Step LoRA Loader, whose
    settings then drive the sampling nodes), text encoded, FLUX.1-dev's guidance where the family has one,
    an EmptySD3LatentImage at SIZE², Few-Step Scheduler and Sampler in SamplerCustom, decode, save."""
    family = get_family(family_name)
    values = card_values(family)
    nodes, model, settings, files = list(loaders.nodes), loaders.model, {}, list(loaders.files)
    if lora is not None:
        lora_name, source = lora
        # strength 1.0 is the card's own scale: the loader multiplies it by the family's lora_scale.
        nodes.append(N("lora", "FewStepLoraLoader", {"lora_name": lora_name, "strength_model": 1.0,
                                                      "strength_clip": 1.0, "family": "detect"},
                       {"model": model}, 0))
        model, settings = ("lora", "MODEL"), {"settings": ("lora", "settings")}
        files.append(f"`models/loras/{lora_name}` — {source}")
    nodes += [
        N("pos", "CLIPTextEncode", {"text": FOX}, {"clip": loaders.clip}, 1, "Positive", 400),
        N("neg", "CLIPTextEncode", {"text": ""}, {"clip": loaders.clip}, 1, "Negative (no effect at cfg 1)", 400),
    ]
    positive = ("pos", 0)
    if values["guidance"] is not None:
        nodes.append(N("guidance", "FluxGuidance", {"guidance": values["guidance"]}, {"conditioning": positive}, 1))
        positive = ("guidance", 0)
    nodes += [
        N("latent", "EmptySD3LatentImage", {"width": SIZE, "height": SIZE, "batch_size": 1}, {}, 1),
        N("sigmas", "FewStepScheduler", {"family": family.name, "steps": values["steps"], "denoise": 1.0},
          {"model": model, **settings, "latent_image": ("latent", 0)}, 2),
        N("sampler", "FewStepSampler", {"family": family.name, "eta": -1.0}, settings, 2),
        N("sample", "SamplerCustom", {"add_noise": True, "noise_seed": SEED, "cfg": values["cfg"]},
          {"model": model, "positive": positive, "negative": ("neg", 0), "sampler": ("sampler", 0),
           "sigmas": ("sigmas", 0), "latent_image": ("latent", 0)}, 3),
        N("decode", "VAEDecode", {}, {"samples": ("sample", 0), "vae": loaders.vae}, 4),
        N("save", "SaveImage", {"filename_prefix": f"FewStep/{name}"}, {"images": ("decode", 0)}, 4, width=400),
    ]
    settings_line = f"{values['steps']} steps, cfg {values['cfg']:g} (no classifier-free guidance)"
    if values["guidance"] is not None:
        settings_line += f", FLUX.1-dev's distilled guidance {values['guidance']:g} (Flux Guidance)"
    if lora is not None and values["lora_scale"] is not None:
        settings_line += (f", LoRA scale {values['lora_scale']:g} (strength 1.0 on Few-Step LoRA Loader applies "
                          "the card's scale)")
    text = f"## {title}\n\n{card}\n\nAt the card's settings: {settings_line}, {SIZE}².\n\n" + download(files)
    return Workflow(name, text, nodes)


FLOW_WORKFLOWS = [
    flow_workflow(
        "flux1_schnell_4step", "flux_schnell", "FLUX.1-schnell · 4 steps",
        "The black-forest-labs/FLUX.1-schnell card: FluxPipeline, 4 steps, guidance_scale 0.",
        flux("flux1-schnell.safetensors",
             "`models/diffusion_models/flux1-schnell.safetensors` — black-forest-labs/FLUX.1-schnell"),
    ),
    flow_workflow(
        "sd35_large_turbo_4step", "sd35_large_turbo", "SD3.5 Large Turbo · 4 steps",
        "The stabilityai/stable-diffusion-3.5-large-turbo card: StableDiffusion3Pipeline, 4 steps, "
        "guidance_scale 0 (ComfyUI's SD3 example suggests cfg 1.2; the card's 0 is cfg 1 here).",
        Loaders(
            [N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": "sd3.5_large_turbo.safetensors"}),
             N("clip", "TripleCLIPLoader", {"clip_name1": CLIP_L, "clip_name2": "clip_g.safetensors",
                                            "clip_name3": T5XXL})],
            ("ckpt", "MODEL"), ("clip", "CLIP"), ("ckpt", "VAE"),
            ["`models/checkpoints/sd3.5_large_turbo.safetensors` — stabilityai/stable-diffusion-3.5-large-turbo "
             "(gated: accept its licence first; the VAE is inside, the text encoders are not)",
             f"`models/text_encoders/{CLIP_L}`, `models/text_encoders/clip_g.safetensors`, "
             f"`models/text_encoders/{T5XXL}` — Comfy-Org/stable-diffusion-3.5-fp8 (text_encoders/)"]),
    ),
    flow_workflow(
        "qwen_image_lightning_8step_lora", "qwen_image_lightning", "Qwen-Image-Lightning · 8-step LoRA",
        "The lightx2v/Qwen-Image-Lightning card: QwenImagePipeline with the distillation's scheduler (shift 3 "
        "at every size), 8 steps, true_cfg_scale 1. For the 4-step LoRA (Qwen-Image-Lightning-4steps-V1.0."
        "safetensors) pick it in the loader: the sampling nodes follow it to 4 steps.",
        unet_clip_vae(QWEN_IMAGE, N("clip", "CLIPLoader", {"clip_name": QWEN_TEXT_ENCODER, "type": "qwen_image"}),
                      QWEN_VAE,
                      [f"`models/diffusion_models/{QWEN_IMAGE}` — Comfy-Org/Qwen-Image_ComfyUI "
                       "(split_files/diffusion_models/)",
                       f"`models/text_encoders/{QWEN_TEXT_ENCODER}` — Comfy-Org/Qwen-Image_ComfyUI "
                       "(split_files/text_encoders/)",
                       f"`models/vae/{QWEN_VAE}` — Comfy-Org/Qwen-Image_ComfyUI (split_files/vae/)"]),
        lora=("Qwen-Image-Lightning-8steps-V1.0.safetensors", "lightx2v/Qwen-Image-Lightning"),
    ),
    flow_workflow(
        "flux1_turbo_alpha_8step_lora", "flux_turbo_alpha", "FLUX.1-Turbo-Alpha · 8-step LoRA on FLUX.1-dev",
        "The alimama-creative/FLUX.1-Turbo-Alpha card: FluxPipeline on FLUX.1-dev with the LoRA fused, 8 steps, "
        "guidance_scale 3.5; FLUX.1-dev's σ shift by image size.",
        flux(FLUX_DEV, FLUX_DEV_FILE),
        lora=("FLUX.1-Turbo-Alpha.safetensors",
              "alimama-creative/FLUX.1-Turbo-Alpha (diffusion_pytorch_model.safetensors, renamed)"),
    ),
    flow_workflow(
        "hyper_flux1_dev_8step_lora", "hyper_flux", "Hyper-FLUX.1-dev · 8-step LoRA",
        "The ByteDance/Hyper-SD card for Hyper-FLUX.1-dev-8steps-lora: FluxPipeline on FLUX.1-dev, "
        "the LoRA fused at the card's scale, 8 steps, guidance_scale 3.5; FLUX.1-dev's σ shift by image size.",
        flux(FLUX_DEV, FLUX_DEV_FILE),
        lora=("Hyper-FLUX.1-dev-8steps-lora.safetensors", "ByteDance/Hyper-SD"),
    ),
    flow_workflow(
        "z_image_turbo_9step", "z_image_turbo", "Z-Image-Turbo · 9 steps",
        "The Tongyi-MAI/Z-Image-Turbo card: ZImagePipeline, num_inference_steps 9, guidance_scale 0.",
        unet_clip_vae(Z_IMAGE_TURBO, N("clip", "CLIPLoader", {"clip_name": QWEN3_4B, "type": "lumina2"}), FLUX_VAE,
                      [f"`models/diffusion_models/{Z_IMAGE_TURBO}` — Comfy-Org/z_image_turbo "
                       "(split_files/diffusion_models/)",
                       f"`models/text_encoders/{QWEN3_4B}` — Comfy-Org/z_image_turbo (split_files/text_encoders/)",
                       f"`models/vae/{FLUX_VAE}` — Comfy-Org/z_image_turbo (split_files/vae/; FLUX.1's VAE)"]),
    ),
]
