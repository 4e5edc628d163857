"""FewStepLoraLoader / FewStepUNetLoader in real ComfyUI against diffusers' own LoRA loading.

One set of random LoRA weights (peft) is written in every published layout; each must load with
every key matched and patch the UNet and text encoder to what diffusers' load_lora_weights + fuse_lora
gives, within 1e-5 relative (fp32 sums in a different order).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import lora_factory
import tiny_models
from comfy_harness import PromptFailed

# Published LoRAs range from rank 4 to 64: each layout is tested at another rank of that range.
RANK_BY_LAYOUT = {"peft": 4, "peft_base_model": 16, "kohya_with_alpha": 64, "kohya": 8, "diffusers_legacy": 32,
                  "comfyui": 8}
RELATIVE_TOLERANCE = 1e-5
LAYOUTS = ["peft", "peft_base_model", "kohya_with_alpha", "kohya", "diffusers_legacy", "comfyui"]


def write_layout(tiny, layout: str, folder) -> tuple[str, dict, object]:
    """(file name, the same LoRA in diffusers' PEFT format, alpha) for diffusers' reference load."""
    targets = lora_factory.ATTENTION_TARGETS if layout == "diffusers_legacy" else lora_factory.ALL_TARGETS
    rank = RANK_BY_LAYOUT[layout]
    peft = lora_factory.peft_lora(tiny, rank, seed=11, targets=targets)
    ldm_config = tiny_models.SDXL_LDM_CONFIG if tiny.base == "sdxl" else tiny_models.SD15_LDM_CONFIG
    converted = {
        "peft": lambda: peft,
        "peft_base_model": lambda: lora_factory.to_base_model_prefix(peft),
        "kohya_with_alpha": lambda: lora_factory.to_kohya(peft, alpha=rank / 2),
        "kohya": lambda: lora_factory.to_kohya(peft, alpha=None),
        "diffusers_legacy": lambda: lora_factory.to_diffusers_legacy(peft),
        "comfyui": lambda: lora_factory.to_comfyui(peft, ldm_config),
    }[layout]()
    name = lora_factory.save(converted, folder, f"style_{tiny.base}_{layout}.safetensors")
    reference = converted if layout.startswith("kohya") else peft
    reference_name = lora_factory.save(reference, folder, f"reference_{tiny.base}_{layout}.safetensors")
    return name, reference_name


@functools.lru_cache(maxsize=None)
def _comfy_checkpoint(comfy, checkpoint_name):
    # Loaded once per base: patches are applied on load and undone on unload, leaving it as it was.
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint_name)


@functools.lru_cache(maxsize=None)
def _diffusers_pipeline(tiny):
    from diffusers import AutoPipelineForText2Image

    # Only the parts a LoRA patches here: skipping the VAE and CLIP-G keeps the test quick.
    skip = {"vae": None, **({"text_encoder_2": None} if tiny.base == "sdxl" else {})}
    return AutoPipelineForText2Image.from_pretrained(str(tiny.diffusers_dir), torch_dtype=torch.float32, **skip)


@pytest.fixture(scope="module", autouse=True)
def _release_cached_models():
    """Drop the cached checkpoints and pipelines when the module ends: a ModelPatcher still alive at
    interpreter exit makes ComfyUI print 'Exception ignored in ModelPatcher.__del__'."""
    yield
    _comfy_checkpoint.cache_clear()
    _diffusers_pipeline.cache_clear()


def comfy_patched(comfy, tiny, lora_name):
    from comfy import model_management as management

    model, clip, _ = _comfy_checkpoint(comfy, tiny.checkpoint_name)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    output = loader.execute(model=model, clip=clip, lora_name=lora_name, strength_model=1.0,
                            strength_clip=1.0, family="detect")
    new_model, new_clip, settings = output.args
    # ComfyUI applies the patches when it loads a model for use; do exactly that.
    management.load_models_gpu([new_model, new_clip.patcher], force_full_load=True)
    unet = {k: v.clone() for k, v in new_model.model.diffusion_model.state_dict().items()}
    text = {k: v.clone() for k, v in new_clip.cond_stage_model.state_dict().items()}
    management.unload_all_models()
    return unet, text, settings, output.ui


def diffusers_fused(tiny, folder, name):
    pipe = copy.deepcopy(_diffusers_pipeline(tiny))
    pipe.load_lora_weights(str(folder), weight_name=name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


def relative_error(ours, expected) -> float:
    return ((ours.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_layout_patches_like_diffusers(comfy, request, base, layout):
    from comfy import utils as comfy_utils

    tiny = request.getfixturevalue(base)
    folder = comfy.models_dir / "loras"
    name, reference_name = write_layout(tiny, layout, folder)
    unet, text, settings, _ = comfy_patched(comfy, tiny, name)
    expected_unet, expected_text = diffusers_fused(tiny, folder, reference_name)

    ldm_config = tiny_models.SDXL_LDM_CONFIG if base == "sdxl" else tiny_models.SD15_LDM_CONFIG
    diffusers_to_ldm = comfy_utils.unet_to_diffusers(ldm_config)
    worst = max(relative_error(unet[diffusers_to_ldm[k]], v) for k, v in expected_unet.items() if k in diffusers_to_ldm)
    assert worst < RELATIVE_TOLERANCE, f"UNet {worst:.2e}"
    # The LoRA must have changed the weights, or the comparison proves nothing.
    clip_prefix = "clip_l.transformer."
    text_errors = []
    for key, value in expected_text.items():
        ours_key = clip_prefix + (key if key.startswith("text_model.") else f"text_model.{key}")
        if ours_key in text:
            text_errors.append(relative_error(text[ours_key], value))
    assert text_errors and max(text_errors) < RELATIVE_TOLERANCE, f"text encoder {max(text_errors):.2e}"
    assert settings.family is None  # a style LoRA: not reported as few-step


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_alpha_saved_by_diffusers_patches_like_diffusers(comfy, request, base):
    """lora_alpha ≠ r, as diffusers' save_lora_weights keeps it (the lora_adapter_metadata header):
    UNet at alpha 4 of rank 8 with one module family at 24, text encoder at 16. diffusers reads the
    header; so must FewStep, or the LoRA lands at the wrong strength."""
    from comfy import utils as comfy_utils

    tiny = request.getfixturevalue(base)
    folder = comfy.models_dir / "loras"
    name = lora_factory.save_with_diffusers(tiny, folder, f"alpha_{base}.safetensors", rank=8, unet_alpha=4,
                                            text_alpha=16, seed=13, unet_alpha_pattern={"ff.net.2": 24})
    unet, text, _, _ = comfy_patched(comfy, tiny, name)
    expected_unet, expected_text = diffusers_fused(tiny, folder, name)
    base_unet = _comfy_checkpoint(comfy, tiny.checkpoint_name)[0].model.diffusion_model.state_dict()

    ldm_config = tiny_models.SDXL_LDM_CONFIG if base == "sdxl" else tiny_models.SD15_LDM_CONFIG
    diffusers_to_ldm = comfy_utils.unet_to_diffusers(ldm_config)
    compared = {k: v for k, v in expected_unet.items() if k in diffusers_to_ldm}
    worst = max(relative_error(unet[diffusers_to_ldm[k]], v) for k, v in compared.items())
    assert worst < RELATIVE_TOLERANCE, f"UNet {worst:.2e}"
    # Every module family was patched, the alpha_pattern one included.
    changed = {k for k, v in compared.items() if not torch.equal(base_unet[diffusers_to_ldm[k]], v)}
    assert any(".ff.net.2." in k for k in changed) and any(".attn1.to_q." in k for k in changed)
    ours = {key: "clip_l.transformer." + (key if key.startswith("text_model.") else f"text_model.{key}")
            for key in expected_text}
    text_errors = [relative_error(text[ours[key]], value) for key, value in expected_text.items() if ours[key] in text]
    assert text_errors and max(text_errors) < RELATIVE_TOLERANCE, f"text encoder {max(text_errors):.2e}"


def test_lora_changes_the_weights(comfy, sd15):
    """Guard for the comparison above: the patched UNet differs from the unpatched one."""
    folder = comfy.models_dir / "loras"
    name, _ = write_layout(sd15, "kohya", folder)
    unet, _, _, _ = comfy_patched(comfy, sd15, name)
    original = _comfy_checkpoint(comfy, sd15.checkpoint_name)[0].model.diffusion_model.state_dict()
    changed = [k for k, v in original.items() if not torch.equal(v, unet[k])]
    assert len(changed) > 20


def test_few_step_lora_is_detected_and_stacking_two_warns(comfy, sd15):
    folder = comfy.models_dir / "loras"
    peft = lora_factory.peft_lora(sd15, 4, seed=3, text_encoder=False)
    lcm = lora_factory.save(peft, folder, "lcm-lora-sdv1-5.safetensors")
    hyper = lora_factory.save(peft, folder, "Hyper-SD15-8steps-lora.safetensors")
    style = lora_factory.save(lora_factory.to_kohya(peft, alpha=2), folder, "paper_cut_style.safetensors")
    model, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15.checkpoint_name)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]

    def load(model, clip, name):
        out = loader.execute(model=model, clip=clip, lora_name=name, strength_model=1.0, strength_clip=1.0)
        assert out.ui["fewstep_settings"][0]["family"] == out.args[2].family  # what web/fewstep.js reads
        return out.args, "\n".join(out.ui["text"])

    (styled, clip2, style_settings), _ = load(model, clip, style)
    (with_lcm, _, lcm_settings), lcm_ui = load(styled, clip2, lcm)
    assert style_settings.family is None and lcm_settings.family == "lcm" and lcm_settings.steps == 4
    assert "warning" not in str(lcm_ui)  # a style LoRA under a few-step LoRA is fine
    (_, _, hyper_settings), hyper_ui = load(with_lcm, clip2, hyper)
    assert hyper_settings.family == "hyper_sd" and hyper_settings.steps == 8
    assert "stacked on another few-step LoRA (lcm-lora-sdv1-5.safetensors)" in str(hyper_ui)


def loader_prompt(tiny, lora_name):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny.checkpoint_name}},
        "lora": {"class_type": "FewStepLoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora_name,
            "strength_model": 1.0, "strength_clip": 1.0, "family": "detect"}},
        "enc": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["lora", 1]}},
        "out": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["enc", 0]}},
        "sched": {"class_type": "FewStepScheduler", "inputs": {"model": ["lora", 0], "family": "lcm", "steps": 4, "denoise": 1.0}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": "lcm", "settings": ["lora", 2]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["lora", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["out", 0],
            "negative": ["out", 0], "sampler": ["sampler", 0], "sigmas": ["sched", 0], "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "lora"}},
    }


def test_bad_files_get_clear_errors_through_the_executor(comfy, sd15, sdxl):
    folder = comfy.models_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    sdxl_lora = lora_factory.save(lora_factory.peft_lora(sdxl, 4, seed=5, text_encoder=False), folder, "lcm-lora-sdxl.safetensors")
    lora_factory.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, folder, "not_a_lora.safetensors")
    good = (folder / sdxl_lora).read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 3])
    (folder / "old_release.ckpt").write_bytes(b"\x80\x04\x95 pickle that must never be opened")
    cases = {
        sdxl_lora: ["lcm-lora-sdxl.safetensors is an SDXL LoRA but the model is SD1.5-family", "SD1.5 release"],
        "not_a_lora.safetensors": ["not_a_lora.safetensors", "not a LoRA"],
        "truncated.safetensors": ["truncated.safetensors", "not a readable .safetensors", "Download it again"],
        "old_release.ckpt": ["old_release.ckpt", "pickle", "does not open it", ".safetensors release"],
    }
    for name, words in cases.items():
        with pytest.raises(PromptFailed) as failure:
            comfy.run(loader_prompt(sd15, name))
        assert failure.value.details["node_id"] == "lora"
        for word in words:
            assert word in failure.value.message, (name, failure.value.message)
    # And a good few-step LoRA runs the whole graph afterwards.
    good_name = lora_factory.save(lora_factory.peft_lora(sd15, 4, seed=6, text_encoder=False), folder, "lcm-lora-sdv1-5.safetensors")
    assert comfy.run(loader_prompt(sd15, good_name)).latent("save").isfinite().all()


def test_unet_loader_detects_x0_lightning_and_refuses_lcm_with_it(comfy, sdxl):
    from comfy import model_sampling

    unet_dir = comfy.models_dir / "diffusion_models"
    x0_name = "sdxl_lightning_1step_unet_x0.safetensors"
    (unet_dir / x0_name).unlink(missing_ok=True)
    (unet_dir / x0_name).symlink_to((unet_dir / sdxl.unet_name).resolve())
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepUNetLoader"]
    model, settings = loader.execute(unet_name=x0_name, family="detect").args
    assert (settings.family, settings.steps, settings.prediction_type) == ("lightning", 1, "sample")
    assert isinstance(model.get_model_object("model_sampling"), model_sampling.X0)
    (plain, plain_settings) = loader.execute(unet_name=sdxl.unet_name, family="detect").args
    assert plain_settings.family is None
    assert not isinstance(plain.get_model_object("model_sampling"), model_sampling.X0)

    prompt = {
        "unet": {"class_type": "FewStepUNetLoader", "inputs": {"unet_name": x0_name, "family": "detect"}},
        "sched": {"class_type": "FewStepScheduler", "inputs": {"model": ["unet", 0], "family": "lcm", "steps": 1, "denoise": 1.0}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": "lcm"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sched", 0],
            "latent_image": ["latent", 0]}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["unet", 0], "conditioning": ["cond", 0]}},
        "cond": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["enc", 0]}},
        "enc": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["ckpt", 1]}},
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl.checkpoint_name}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "x0"}},
    }
    with pytest.raises(PromptFailed) as failure:
        comfy.run(prompt)
    assert "predicts x0" in failure.value.message and "set family to lightning" in failure.value.message


def test_graph_with_lora_reproduces_diffusers_pipeline_with_lora(comfy, sd15):
    from diffusers_reference import DiffusersSide
    from graphs import PROMPT, SEED, sampling_prompt

    folder = comfy.models_dir / "loras"
    name = lora_factory.save(lora_factory.to_kohya(lora_factory.peft_lora(sd15, 8, seed=21), alpha=4.0),
                             folder, "lcm-lora-sdv1-5.safetensors")
    prompt = sampling_prompt(sd15, "lcm", 4, 1.0)
    prompt["lora"] = {"class_type": "FewStepLoraLoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": name, "strength_model": 1.0,
        "strength_clip": 1.0, "family": "detect"}}
    for node in prompt.values():
        for input_name, value in node["inputs"].items():
            if value in (["ckpt", 0], ["ckpt", 1]) and node is not prompt["lora"]:
                node["inputs"][input_name] = ["lora", value[1]]
    prompt["sampler"]["inputs"]["settings"] = ["lora", 2]
    ours = comfy.run(prompt).latent("save") * sd15.latent_scale

    reference = DiffusersSide(sd15)
    reference.pipe.load_lora_weights(str(folder), weight_name=name)
    reference.pipe.fuse_lora(lora_scale=1.0)
    _, expected = reference.sample("lcm", 4, 1.0, PROMPT, SEED)
    assert (ours - expected).abs().max().item() <= 1e-3
