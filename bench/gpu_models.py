"""bench/gpu.py's subject: the models and settings benchmarked (the real SDXL and SD1.5 architectures
with random fp16 weights, or the tests' tiny models), the columns of its table, and the files built for them."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
import tiny_models  # noqa: E402


from gpu_timing import log  # noqa: E402

PROMPT = "a photo of a red fox in the snow, highly detailed"
SEED = 1234
CHECK_SEED = 777
LORA_RANK = 64  # LCM-LoRA SD1.5's rank (latent-consistency/lcm-lora-sdv1-5)

# What a ComfyUI user does without FewStep (bench/fidelity.py's routes).
NATIVE_ROUTES = {
    "lightning": ("euler", "sgm_uniform"),
    "turbo": ("euler_ancestral", "SDTurboScheduler"),
    "lcm": ("lcm", "sgm_uniform"),
    "hyper_sd_1step_unet": ("lcm", "sgm_uniform"),
}


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    base: str  # "sdxl" or "sd15"
    family: str  # FewStep family
    steps: int
    size: int
    lora: bool = False
    diffusers_timesteps: tuple | None = None  # passed to the pipeline where the card passes them
    targets_ms: float | None = None  # the end-to-end target with acceleration (H100)
    batches: tuple = (1, 4)  # batch sizes timed (the 12B/8B flow rows: batch 1)


CONFIGS = [  # turbo first: the quickest exercise of every column
    Config("turbo", "SDXL-Turbo 1-step 512²", "sdxl", "turbo", 1, 512, targets_ms=20.0),
    Config("lightning", "SDXL-Lightning 4-step 1024²", "sdxl", "lightning", 4, 1024, targets_ms=120.0),
    Config("hyper_sd", "Hyper-SDXL 1-step UNet 1024²", "sdxl", "hyper_sd_1step_unet", 1, 1024,
           diffusers_timesteps=(800,)),
    Config("lcm_lora", "LCM-LoRA SD1.5 4-step 512²", "sd15", "lcm", 4, 512, lora=True),
]
COLUMNS = ["diffusers eager", "ComfyUI native", "ComfyUI + FewStep", "ComfyUI + FewStep accelerated"]
ABLATION = "accelerated, CUDA graphs only"  # --ablation: FewStepAccelerate with compile_kernels off, same run
# A cell not started because the run's --budget-s was spent: reported, but not a failure of the run.
SKIPPED = "skipped: over the time budget"

# The real architectures (diffusers configs of stabilityai/stable-diffusion-xl-base-1.0 and
# runwayml/stable-diffusion-v1-5) and the same UNets as ComfyUI ldm configs for the key map.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_LDM = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest: diffusers' defaults = SD1.x
SD15_LDM = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)


def tiny_config(config: Config) -> Config:
    """`config` for the tests' tiny models (--smoke, --tiny): 64² images, no end-to-end target."""
    return Config(config.key, config.title.replace("1024²", "64²").replace("512²", "64²") + ", tiny model",
                  config.base, config.family, config.steps, 64, config.lora, config.diffusers_timesteps,
                  batches=config.batches)


# ------------------------------------------------------------------------------------------- models

@dataclass
class Built:
    checkpoint_name: str | None  # None: the flow rows load a diffusion model and a VAE apart
    pipeline_factory: object  # () → diffusers pipeline on the device
    lora_name: str | None = None
    lora: dict | None = None  # the same LoRA for diffusers' load_lora_weights
    unet_name: str | None = None  # flow rows: under models/diffusion_models, for UNETLoader
    vae_name: str | None = None  # flow rows: under models/vae, for VAELoader
    conditioning: dict | None = None  # flow rows: tag → (prompt embeds, pooled), fed to both sides
    files: list = field(default_factory=list)  # written for this model only: deleted after its rows (disk)


def random_lora(unet_config: dict, device, dtype, seed: int) -> dict:
    """A random LoRA of LCM-LoRA's rank over the UNet's attention, feed-forward and resnet layers, in
    kohya's layout (both ComfyUI's LoraLoader and diffusers' load_lora_weights read it). The module
    list and shapes come from peft on a meta-device UNet; the values are drawn here."""
    import lora_factory
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=lora_factory.ALL_TARGETS,
                                    init_lora_weights=False))
        shapes = {f"unet.{k}": v.shape for k, v in get_peft_model_state_dict(unet).items()}
    generator = torch.Generator(device).manual_seed(seed)
    lora = {}
    for key, shape in sorted(shapes.items()):
        fan_in = math.prod(shape[1:])
        scale = (0.01 if ".lora_B." in key else 1.0) / math.sqrt(fan_in)
        lora[key] = (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)
    return lora_factory.to_kohya(lora, alpha=LORA_RANK)


def save_checkpoint(path: Path, unet, ldm_config, clip_and_vae: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.diffusion_model.{k}": v for k, v in tiny_models.unet_to_ldm(unet.state_dict(), ldm_config).items()}
    tensors.update(clip_and_vae)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def build_full(base: str, models_dir: Path, device: str, dtype) -> Built:
    """Full-size random-weight SDXL or SD1.5 (UNet, CLIP, VAE) made on the device in `dtype`, saved
    as one checkpoint in ComfyUI's layout; the diffusers pipeline reuses the same modules."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    started = time.perf_counter()
    torch.manual_seed(SEED)
    unet_config = SDXL_UNET if base == "sdxl" else SD15_UNET
    scale = tiny_models.SDXL_LATENT_SCALE if base == "sdxl" else tiny_models.SD15_LATENT_SCALE
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype).eval()
        # force_upcast=False: decode in fp16 as with the fp16-fixed SDXL VAE, not upcast to fp32.
        vae = AutoencoderKL(**tiny_models.VAE_CONFIG, scaling_factor=scale, force_upcast=False).to(dtype).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_models.CLIP_L_CONFIG)).to(dtype).eval()
        text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**tiny_models.CLIP_G_CONFIG)).to(dtype).eval()
                          if base == "sdxl" else None)
    vae_ldm = {f"first_stage_model.{k}": v for k, v in tiny_models.vae_to_ldm(vae.state_dict()).items()}
    if base == "sdxl":
        clip_and_vae = {f"conditioner.embedders.0.transformer.{k}": v for k, v in tiny_models.clip_hf_keys(text_encoder).items()}
        clip_and_vae.update({f"conditioner.embedders.1.model.{k}": v
                             for k, v in tiny_models.clip_g_to_open_clip(text_encoder_2).items()})
    else:
        clip_and_vae = {f"cond_stage_model.transformer.{k}": v for k, v in tiny_models.clip_hf_keys(text_encoder).items()}
    clip_and_vae.update(vae_ldm)
    name = f"bench_{base}.safetensors"
    save_checkpoint(models_dir / "checkpoints" / name, unet, SDXL_LDM if base == "sdxl" else SD15_LDM, clip_and_vae)
    del clip_and_vae, vae_ldm
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    log(f"built {base}: UNet {params:.2f}B parameters, checkpoint "
        f"{(models_dir / 'checkpoints' / name).stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - started:.1f}s")

    def pipeline():
        if base == "sdxl":
            return StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny_models.make_tokenizer(),
                tokenizer_2=tiny_models.make_tokenizer(pad_token="!"), unet=unet,
                scheduler=tiny_models.reference_scheduler())
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tiny_models.make_tokenizer(), unet=unet,
            scheduler=tiny_models.reference_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    built = Built(name, pipeline)
    if base == "sd15":
        built.lora = random_lora(unet_config, device, dtype, SEED + 7)
        built.lora_name = save_lora(models_dir, built.lora)
    return built


def save_lora(models_dir: Path, lora: dict) -> str:
    from safetensors.torch import save_file

    name = "bench_lcm_lora_sd15.safetensors"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in lora.items()}, str(models_dir / "loras" / name))
    return name


def build_tiny(base: str, models_dir: Path) -> Built:
    """--smoke and --tiny: the tests' tiny models (fp32 files; diffusers runs them in fp32), same code paths."""
    from diffusers import AutoPipelineForText2Image

    tiny = tiny_models.build_sdxl(models_dir) if base == "sdxl" else tiny_models.build_sd15(models_dir)
    built = Built(tiny.checkpoint_name,
                  lambda: AutoPipelineForText2Image.from_pretrained(str(tiny.diffusers_dir), torch_dtype=torch.float32))
    if base == "sd15":
        config = json.loads((tiny.diffusers_dir / "unet" / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        built.lora = random_lora(config, "cpu", torch.float32, SEED + 7)
        built.lora_name = save_lora(models_dir, built.lora)
    return built




def add_fewstep_sampling(prompt: dict, p: str, model: list, config: Config, seed: int, common: dict,
                         **scheduler_inputs) -> None:
    """The FewStep columns' sampling: Few-Step Scheduler + Sampler inside SamplerCustom (nodes named `p`…)."""
    prompt[f"{p}sigmas"] = {"class_type": "FewStepScheduler", "inputs": {
        "model": model, "family": config.family, "steps": config.steps, "denoise": 1.0, **scheduler_inputs}}
    prompt[f"{p}sampler"] = {"class_type": "FewStepSampler", "inputs": {"family": config.family}}
    prompt[f"{p}sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model, "add_noise": True, "noise_seed": seed, "cfg": 1.0,
        "sampler": [f"{p}sampler", 0], "sigmas": [f"{p}sigmas", 0], **common}}


def add_decode_and_sink(prompt: dict, p: str, vae: list, tag: str) -> None:
    """Every column's end: VAE Decode of `p`sample, then the bench's sink node (image and latent)."""
    prompt[f"{p}decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{p}sample", 0], "vae": vae}}
    prompt[f"{p}sink"] = {"class_type": "FewStepBenchSink",
                          "inputs": {"images": [f"{p}decode", 0], "latent": [f"{p}sample", 0], "tag": tag}}
