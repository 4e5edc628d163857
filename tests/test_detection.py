"""Family detection for files named and tagged as published (ComfyUI-free)."""
import pytest

from comfyui_fewstep.fewstep.detection import detect_settings

PUBLISHED = [
    # (file name as released, family, steps, cfg, prediction type)
    ("lcm-lora-sdv1-5.safetensors", "lcm", 4, 1.0, "epsilon"),
    ("lcm-lora-sdxl.safetensors", "lcm", 4, 1.0, "epsilon"),
    ("sdxl_lightning_2step_lora.safetensors", "lightning", 2, 1.0, "epsilon"),
    ("sdxl_lightning_4step_lora.safetensors", "lightning", 4, 1.0, "epsilon"),
    ("sdxl_lightning_8step_lora.safetensors", "lightning", 8, 1.0, "epsilon"),
    ("sdxl_lightning_1step_unet_x0.safetensors", "lightning", 1, 1.0, "sample"),
    ("sdxl_lightning_2step_unet.safetensors", "lightning", 2, 1.0, "epsilon"),
    ("sdxl_lightning_4step_unet.safetensors", "lightning", 4, 1.0, "epsilon"),
    ("sdxl_lightning_8step_unet.safetensors", "lightning", 8, 1.0, "epsilon"),
    ("Hyper-SD15-1step-lora.safetensors", "hyper_sd_1step", 1, 1.0, "epsilon"),
    ("Hyper-SDXL-1step-lora.safetensors", "hyper_sd_1step", 1, 1.0, "epsilon"),
    ("Hyper-SD15-2steps-lora.safetensors", "hyper_sd", 2, 1.0, "epsilon"),
    ("Hyper-SDXL-4steps-lora.safetensors", "hyper_sd", 4, 1.0, "epsilon"),
    ("Hyper-SDXL-8steps-lora.safetensors", "hyper_sd", 8, 1.0, "epsilon"),
    ("Hyper-SD15-12steps-CFG-lora.safetensors", "hyper_sd", 12, 5.0, "epsilon"),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", "hyper_sd", 8, 5.0, "epsilon"),
    ("Hyper-SDXL-1step-Unet.safetensors", "hyper_sd_1step_unet", 1, 1.0, "epsilon"),
    ("TCD-SD15-LoRA.safetensors", "tcd", 4, 1.0, "epsilon"),
    ("TCD-SDXL-LoRA.safetensors", "tcd", 4, 1.0, "epsilon"),
    ("dmd2_sdxl_4step_unet_fp16.safetensors", "dmd2", 4, 1.0, "epsilon"),
    ("dmd2_sdxl_4step_lora_fp16.safetensors", "dmd2", 4, 1.0, "epsilon"),
    ("sd_xl_turbo_1.0_fp16.safetensors", "turbo", 1, 1.0, "epsilon"),
]


@pytest.mark.parametrize("name,family,steps,cfg,prediction", PUBLISHED)
def test_published_names(name, family, steps, cfg, prediction):
    settings = detect_settings(name)
    assert (settings.family, settings.steps, settings.cfg, settings.prediction_type) == (family, steps, cfg, prediction)
    assert "file name" in settings.reason


def test_tcd_and_hyper_one_step_carry_their_eta():
    assert detect_settings("TCD-SDXL-LoRA.safetensors").eta == 0.3
    assert detect_settings("Hyper-SDXL-1step-lora.safetensors").eta == 1.0


def test_style_lora_is_not_few_step():
    settings = detect_settings("watercolor_style_v2.safetensors", {"ss_output_name": "watercolor_style_v2"})
    assert settings.family is None
    assert "not a few-step model" in settings.summary()


def test_metadata_wins_over_a_renamed_file():
    settings = detect_settings("my_favourite.safetensors", {"ss_output_name": "sdxl_lightning_8step_lora"})
    assert (settings.family, settings.steps) == ("lightning", 8)
    assert "metadata ss_output_name" in settings.reason


FLOW_PUBLISHED = [
    # (file name as released, family, steps)
    ("flux1-schnell.safetensors", "flux_schnell", 4),
    ("FLUX.1-schnell.safetensors", "flux_schnell", 4),
    ("sd3.5_large_turbo.safetensors", "sd35_large_turbo", 4),
    ("Qwen-Image-Lightning-8steps-V1.0.safetensors", "qwen_image_lightning", 8),
    ("Qwen-Image-Lightning-4steps-V1.0-bf16.safetensors", "qwen_image_lightning", 4),
    ("Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", "qwen_image_lightning", 4),
    ("Hyper-FLUX.1-dev-8steps-lora.safetensors", "hyper_flux", 8),
    ("Hyper-FLUX.1-dev-16steps-lora.safetensors", "hyper_flux", 16),
    ("flux.1-turbo-alpha-lora.safetensors", "flux_turbo_alpha", 8),
    ("z_image_turbo_bf16.safetensors", "z_image_turbo", 9),
    ("flux1-schnell-fp8.safetensors", "flux_schnell", 4),
    ("sd3.5_large_turbo_fp8_scaled.safetensors", "sd35_large_turbo", 4),
    ("Qwen-Image-Lightning-8steps-V1.1-bf16.safetensors", "qwen_image_lightning", 8),
    ("Qwen-Image-Lightning-8steps-V2.0.safetensors", "qwen_image_lightning", 8),
    ("Qwen-Image-2512-Lightning-4steps-V1.0-fp32.safetensors", "qwen_image_lightning", 4),
    ("Qwen-Image-Edit-Lightning-8steps-V1.0.safetensors", "qwen_image_lightning", 8),
    ("Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors", "qwen_image_lightning", 4),
    # Files with the libraries' generic names are named by the folder they were downloaded into.
    ("FLUX.1-Turbo-Alpha/diffusion_pytorch_model.safetensors", "flux_turbo_alpha", 8),
    ("FLUX.1-Turbo-Alpha\\diffusion_pytorch_model.safetensors", "flux_turbo_alpha", 8),
    ("Hyper-FLUX.1-dev-8steps-lora/pytorch_lora_weights.safetensors", "hyper_flux", 8),
    ("Z-Image-Turbo/transformer/diffusion_pytorch_model.safetensors", "z_image_turbo", 9),
    ("stable-diffusion-3.5-large-turbo/transformer/diffusion_pytorch_model.safetensors", "sd35_large_turbo", 4),
    ("FLUX.1-schnell/transformer/diffusion_pytorch_model-00001-of-00003.safetensors", "flux_schnell", 4),
]


@pytest.mark.parametrize("name,family,steps", FLOW_PUBLISHED)
def test_flow_published_names(name, family, steps):
    settings = detect_settings(name)
    assert (settings.family, settings.steps, settings.cfg) == (family, steps, 1.0)


def test_generic_file_in_a_plain_folder_is_not_few_step():
    assert detect_settings("my_style/diffusion_pytorch_model.safetensors").family is None
    # A file's own name wins over its folder's.
    assert detect_settings("sdxl_lightning/my_style.safetensors").family is None


@pytest.mark.parametrize("name,scale", [
    ("Hyper-FLUX.1-dev-8steps-lora.safetensors", 0.125),  # Hyper-SD card: fuse_lora(lora_scale=0.125)
    ("Hyper-FLUX.1-dev-16steps-lora.safetensors", 0.125),
    ("FLUX.1-Turbo-Alpha/diffusion_pytorch_model.safetensors", 1.0),
    ("Qwen-Image-Lightning-4steps-V1.0.safetensors", 1.0),
    ("sdxl_lightning_4step_lora.safetensors", 1.0),
    ("watercolor_style_v2.safetensors", 1.0),
])
def test_card_lora_scale_of_published_files(name, scale):
    from comfyui_fewstep.fewstep.lora_layouts import card_lora_scale

    assert card_lora_scale(detect_settings(name).family) == scale


def test_family_must_fit_the_model_base():
    from comfyui_fewstep.fewstep.detection import check_family_fits_model
    from comfyui_fewstep.fewstep.families import FewStepInputError, get_family

    check_family_fits_model(get_family("flux_schnell"), "FluxSchnell", flow_model=True)
    check_family_fits_model(get_family("lcm"), "SDXL", flow_model=False)
    with pytest.raises(FewStepInputError, match="set family to flux_schnell"):
        check_family_fits_model(get_family("lcm"), "FluxSchnell", flow_model=True)
    with pytest.raises(FewStepInputError, match="set family to flux_turbo_alpha or hyper_flux"):
        check_family_fits_model(get_family("flux_schnell"), "Flux", flow_model=True)
    with pytest.raises(FewStepInputError, match="runs on SD3 models"):
        check_family_fits_model(get_family("sd35_large_turbo"), "SDXL", flow_model=False)
