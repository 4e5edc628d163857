"""The example workflows, one description each: nodes, widget values and links at each model card's
settings (scripts/build_example_workflows.py lays them out and writes the JSON)."""
from __future__ import annotations

from dataclasses import dataclass, field

SEED = 42
UI_ONLY = {"MarkdownNote": ["text"]}  # frontend-only nodes: their widgets, as the frontend saves them

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
SDXL_TURBO = "sd_xl_turbo_1.0_fp16.safetensors"
FOX = "a cinematic photo of a red fox in the snow, golden hour, highly detailed"


@dataclass
class N:
    """A node: its key in the description, class, widget values and links {input: (node key, output)}."""

    key: str
    type: str
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    column: int = 0
    title: str | None = None
    width: int | None = None  # None: wide enough for the frontend's title and widgets (node_width)


@dataclass
class Workflow:
    name: str
    note: str
    nodes: list[N]


def note(text: str) -> N:
    return N("note", "MarkdownNote", {"text": text}, column=0, width=420)


def sdxl_text(clip_from: str, positive: str = FOX, column: int = 1) -> list[N]:
    return [
        N("pos", "CLIPTextEncode", {"text": positive}, {"clip": (clip_from, "CLIP")}, column, "Positive", 400),
        N("neg", "CLIPTextEncode", {"text": ""}, {"clip": (clip_from, "CLIP")}, column,
          "Negative (no effect at cfg 1)", 400),
    ]


def custom_sampling(family: str, steps: int, model_from: tuple, latent_from: tuple, cfg: float = 1.0,
                    denoise: float = 1.0, settings_from: tuple | None = None, eta: float = -1.0,
                    column: int = 2, vae_from: tuple = ("ckpt", "VAE"), prefix: str = "FewStep") -> list[N]:
    """FewStepScheduler + FewStepSampler in ComfyUI's SamplerCustom, then decode and save."""
    settings = {"settings": settings_from} if settings_from else {}
    return [
        N("sigmas", "FewStepScheduler", {"family": family, "steps": steps, "denoise": denoise},
          {"model": model_from, **settings}, column),
        N("sampler", "FewStepSampler", {"family": family, "eta": eta}, settings, column),
        N("sample", "SamplerCustom", {"add_noise": True, "noise_seed": SEED, "cfg": cfg},
          {"model": model_from, "positive": ("pos", 0), "negative": ("neg", 0), "sampler": ("sampler", 0),
           "sigmas": ("sigmas", 0), "latent_image": latent_from}, column + 1),
        N("decode", "VAEDecode", {}, {"samples": ("sample", 0), "vae": vae_from}, column + 2),
        N("save", "SaveImage", {"filename_prefix": prefix}, {"images": ("decode", 0)}, column + 2, width=400),
    ]


def empty_latent(size: int, column: int = 1) -> N:
    return N("latent", "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {}, column)


def lora_graph(name: str, checkpoint: str, lora: str, family: str, steps: int, size: int, card: str,
               cfg: float = 1.0, eta: float = -1.0) -> Workflow:
    """A base checkpoint with a few-step LoRA; the loader's detected settings drive the sampling nodes."""
    return Workflow(name, card, [
        N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": checkpoint}, column=0),
        N("lora", "FewStepLoraLoader", {"lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0,
                                        "family": "detect"},
          {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")}, 0),
        *sdxl_text("lora"),
        empty_latent(size),
        *custom_sampling(family, steps, ("lora", "MODEL"), ("latent", 0), cfg=cfg, eta=eta,
                         settings_from=("lora", "settings"), prefix=f"FewStep/{name}"),
    ])


def unet_graph(name: str, unet: str, family: str, steps: int, size: int, card: str) -> Workflow:
    """A distilled UNet; the SDXL base checkpoint supplies the text encoders and VAE."""
    return Workflow(name, card, [
        N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL}, column=0),
        N("unet", "FewStepUNetLoader", {"unet_name": unet, "family": "detect"}, column=0),
        *sdxl_text("ckpt"),
        empty_latent(size),
        *custom_sampling(family, steps, ("unet", "MODEL"), ("latent", 0), settings_from=("unet", "settings"),
                         prefix=f"FewStep/{name}"),
    ])


def download(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


WORKFLOWS = [
    lora_graph(
        "lcm_lora_sd15_4step", SD15, "lcm-lora-sdv1-5.safetensors", "lcm", 4, 512,
        "## LCM-LoRA · SD1.5 · 4 steps\n\nThe latent-consistency/lcm-lora-sdv1-5 card: LCMScheduler, 4 steps, "
        "guidance 1 (LCM-LoRA takes cfg 1–2; above 1 the negative prompt counts), 512².\n\n"
        + download([f"`models/checkpoints/{SD15}` — any SD1.5 checkpoint",
                    "`models/loras/lcm-lora-sdv1-5.safetensors` — latent-consistency/lcm-lora-sdv1-5 "
                    "(pytorch_lora_weights.safetensors, renamed)"]),
    ),
    lora_graph(
        "lcm_lora_sdxl_4step", SDXL, "lcm-lora-sdxl.safetensors", "lcm", 4, 1024,
        "## LCM-LoRA · SDXL · 4 steps\n\nThe latent-consistency/lcm-lora-sdxl card: LCMScheduler, 4 steps, "
        "guidance 1, 1024².\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/loras/lcm-lora-sdxl.safetensors` — latent-consistency/lcm-lora-sdxl "
                    "(pytorch_lora_weights.safetensors, renamed)"]),
    ),
    Workflow("sdxl_turbo_1step_txt2img",
             "## SDXL-Turbo · 1 step · text to image\n\nThe stabilityai/sdxl-turbo card: EulerAncestral with "
             "trailing timesteps (t = 999), 1 step, guidance 0 (cfg 1), 512² — the resolution it was "
             "distilled at.\n\n" + download([f"`models/checkpoints/{SDXL_TURBO}` — stabilityai/sdxl-turbo"]), [
                 N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL_TURBO}, column=0),
                 *sdxl_text("ckpt"),
                 empty_latent(512),
                 *custom_sampling("turbo", 1, ("ckpt", "MODEL"), ("latent", 0), prefix="FewStep/sdxl_turbo"),
             ]),
    Workflow("sdxl_turbo_1step_accelerated",
             "## SDXL-Turbo · 1 step · accelerated\n\nSDXL-Turbo's text-to-image workflow with Few-Step "
             "Accelerate between the checkpoint and the sampler: the UNet and the VAE decode are replayed as "
             "CUDA graphs and compiled (torch.compile) in the background. The first run of a size does not "
             "wait for the compiler: it runs on graphs of the eager kernels, and later runs switch to the "
             "compiled graphs when they are ready (minutes for SDXL with an empty cache; README, Speed). On a "
             "CPU, with a ControlNet or with model patches it runs eagerly and says why.\n\n"
             + download([f"`models/checkpoints/{SDXL_TURBO}` — stabilityai/sdxl-turbo"]), [
                 N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL_TURBO}, column=0),
                 N("accel", "FewStepAccelerate",
                   {"autotune_convolutions": False, "max_shapes": 4, "compile_kernels": True},
                   {"model": ("ckpt", "MODEL"), "vae": ("ckpt", "VAE")}, 0, "Few-Step Accelerate"),
                 *sdxl_text("ckpt"),
                 empty_latent(512),
                 *custom_sampling("turbo", 1, ("accel", "MODEL"), ("latent", 0), vae_from=("accel", "VAE"),
                                  prefix="FewStep/sdxl_turbo_accelerated"),
             ]),
    Workflow("sdxl_turbo_2step_img2img",
             "## SDXL-Turbo · image to image · 2 steps at denoise 0.5\n\nThe sdxl-turbo card's img2img: "
             "strength 0.5 with 2 steps runs int(2 × 0.5) = 1 step, at t = 499 (steps × denoise must be "
             "≥ 1). Load your own picture in Load Image; it is scaled to 512².\n\n"
             + download([f"`models/checkpoints/{SDXL_TURBO}` — stabilityai/sdxl-turbo"]), [
                 N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL_TURBO}, column=0),
                 N("image", "LoadImage", {"image": "fewstep_input.png"}, column=0),
                 *sdxl_text("ckpt", "a cat wizard, detailed, 8k"),
                 N("scale", "ImageScale", {"upscale_method": "lanczos", "width": 512, "height": 512,
                                           "crop": "center"}, {"image": ("image", "IMAGE")}, 1),
                 N("encode", "VAEEncode", {}, {"pixels": ("scale", 0), "vae": ("ckpt", "VAE")}, 1),
                 *custom_sampling("turbo", 2, ("ckpt", "MODEL"), ("encode", 0), denoise=0.5,
                                  prefix="FewStep/sdxl_turbo_img2img"),
             ]),
    lora_graph(
        "sdxl_lightning_4step_lora", SDXL, "sdxl_lightning_4step_lora.safetensors", "lightning", 4, 1024,
        "## SDXL-Lightning · 4-step LoRA\n\nThe ByteDance/SDXL-Lightning card: EulerDiscrete with trailing "
        "timesteps (999, 749, 499, 249), guidance 0 (cfg 1), 1024².\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/loras/sdxl_lightning_4step_lora.safetensors` — ByteDance/SDXL-Lightning"]),
    ),
    unet_graph(
        "sdxl_lightning_1step_unet", "sdxl_lightning_1step_unet_x0.safetensors", "lightning", 1, 1024,
        "## SDXL-Lightning · 1-step UNet (x0)\n\nThe 1-step UNet predicts x₀: Few-Step UNet Loader reads "
        "that from its name and sets the model up for it; sampled with Euler at t = 999, cfg 1, 1024². "
        "The SDXL base checkpoint supplies the text encoders and VAE.\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/diffusion_models/sdxl_lightning_1step_unet_x0.safetensors` — ByteDance/SDXL-Lightning"]),
    ),
    lora_graph(
        "hyper_sdxl_1step_lora", SDXL, "Hyper-SDXL-1step-lora.safetensors", "hyper_sd_1step", 1, 1024,
        "## Hyper-SD · SDXL 1-step LoRA\n\nThe ByteDance/Hyper-SD card for the 1-step LoRA: TCDScheduler "
        "with eta (gamma) 1.0, 1 step, guidance 0 (cfg 1), 1024². Lower eta for more detail.\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/loras/Hyper-SDXL-1step-lora.safetensors` — ByteDance/Hyper-SD"]),
    ),
    lora_graph(
        "hyper_sdxl_8step_lora", SDXL, "Hyper-SDXL-8steps-lora.safetensors", "hyper_sd", 8, 1024,
        "## Hyper-SD · SDXL 8-step LoRA\n\nThe ByteDance/Hyper-SD card: DDIMScheduler with trailing "
        "timesteps, 8 steps, guidance 0 (cfg 1), 1024². The CFG variants "
        "(Hyper-SDXL-8steps-CFG-lora) take cfg 5–8 with a negative prompt.\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/loras/Hyper-SDXL-8steps-lora.safetensors` — ByteDance/Hyper-SD"]),
    ),
    lora_graph(
        "tcd_sdxl_4step_lora", SDXL, "TCD-SDXL-LoRA.safetensors", "tcd", 4, 1024,
        "## TCD · SDXL LoRA · 4 steps\n\nThe h1t/TCD-SDXL-LoRA card: TCDScheduler, 4 steps, eta (gamma) "
        "0.3, guidance 0 (cfg 1), 1024². Higher eta: less detail, more stability.\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/loras/TCD-SDXL-LoRA.safetensors` — h1t/TCD-SDXL-LoRA "
                    "(pytorch_lora_weights.safetensors, renamed)"]),
    ),
    lora_graph(
        "dmd2_sdxl_4step_lora", SDXL, "dmd2_sdxl_4step_lora.safetensors", "dmd2", 4, 1024,
        "## DMD2 · SDXL 4-step LoRA\n\nThe tianweiy/DMD2 card: LCMScheduler at timesteps 999, 749, 499, "
        "249, guidance 0 (cfg 1), 1024².\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/loras/dmd2_sdxl_4step_lora.safetensors` — tianweiy/DMD2"]),
    ),
    unet_graph(
        "hyper_sdxl_1step_unet", "Hyper-SDXL-1step-Unet.safetensors", "hyper_sd_1step_unet", 1, 1024,
        "## Hyper-SD · SDXL 1-step UNet\n\nThe ByteDance/Hyper-SD card for Hyper-SDXL-1step-Unet: "
        "LCMScheduler at timestep 800 (not 999), 1 step, guidance 0 (cfg 1), 1024². The SDXL base "
        "checkpoint supplies the text encoders and VAE.\n\n"
        + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                    "`models/diffusion_models/Hyper-SDXL-1step-Unet.safetensors` — ByteDance/Hyper-SD"]),
    ),
    Workflow("sdxl_lightning_4step_controlnet_canny",
             "## SDXL-Lightning 4-step LoRA · with a Canny ControlNet\n\nSDXL-Lightning's settings (Euler, "
             "trailing, 4 steps, cfg 1, 1024²) with ComfyUI's own ControlNet nodes: the edges of the "
             "picture in Load Image guide the layout.\n\n"
             + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                         "`models/loras/sdxl_lightning_4step_lora.safetensors` — ByteDance/SDXL-Lightning",
                         "`models/controlnet/controlnet-canny-sdxl-1.0.safetensors` — "
                         "diffusers/controlnet-canny-sdxl-1.0 (diffusion_pytorch_model.safetensors, renamed)"]), [
                 N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL}, column=0),
                 N("lora", "FewStepLoraLoader", {"lora_name": "sdxl_lightning_4step_lora.safetensors",
                                                 "strength_model": 1.0, "strength_clip": 1.0, "family": "detect"},
                   {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")}, 0),
                 N("image", "LoadImage", {"image": "fewstep_input.png"}, column=0),
                 N("controlnet", "ControlNetLoader",
                   {"control_net_name": "controlnet-canny-sdxl-1.0.safetensors"}, column=0),
                 *sdxl_text("lora"),
                 N("canny", "Canny", {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": ("image", "IMAGE")}, 1),
                 empty_latent(1024),
                 N("apply", "ControlNetApplyAdvanced", {"strength": 0.7, "start_percent": 0.0, "end_percent": 1.0},
                   {"positive": ("pos", 0), "negative": ("neg", 0), "control_net": ("controlnet", 0),
                    "image": ("canny", 0), "vae": ("ckpt", "VAE")}, 2),
                 *[node if node.key != "sample" else N(
                     "sample", "SamplerCustom", node.widgets,
                     {**node.links, "positive": ("apply", 0), "negative": ("apply", 1)}, 4)
                   for node in custom_sampling("lightning", 4, ("lora", "MODEL"), ("latent", 0),
                                               settings_from=("lora", "settings"), column=3,
                                               prefix="FewStep/sdxl_lightning_controlnet")],
             ]),
    Workflow("fewstep_ksampler_sdxl_lightning_4step",
             "## One node: Few-Step KSampler\n\nWired like ComfyUI's KSampler: the LoRA loader detects "
             "SDXL-Lightning 4-step from the file and the sampler follows its card (Euler, trailing, "
             "4 steps, cfg 1). Swap in any few-step LoRA — the family follows the file.\n\n"
             + download([f"`models/checkpoints/{SDXL}` — stabilityai/stable-diffusion-xl-base-1.0",
                         "`models/loras/sdxl_lightning_4step_lora.safetensors` — ByteDance/SDXL-Lightning"]), [
                 N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL}, column=0),
                 N("lora", "FewStepLoraLoader", {"lora_name": "sdxl_lightning_4step_lora.safetensors",
                                                 "strength_model": 1.0, "strength_clip": 1.0, "family": "detect"},
                   {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")}, 0),
                 *sdxl_text("lora"),
                 empty_latent(1024),
                 N("sample", "FewStepKSampler",
                   {"seed": SEED, "family": "lightning", "steps": 4, "cfg": 1.0, "denoise": 1.0, "eta": -1.0},
                   {"model": ("lora", "MODEL"), "positive": ("pos", 0), "negative": ("neg", 0),
                    "latent_image": ("latent", 0), "settings": ("lora", "settings")}, 2),
                 N("decode", "VAEDecode", {}, {"samples": ("sample", 0), "vae": ("ckpt", "VAE")}, 3),
                 N("save", "SaveImage", {"filename_prefix": "FewStep/fewstep_ksampler"}, {"images": ("decode", 0)},
                   3, width=400),
             ]),
]
