"""The pack in real ComfyUI, and the tiny models through ComfyUI's own loader nodes."""
from __future__ import annotations

import torch

FEWSTEP_NODE_PREFIX = "FewStep"


def test_server_lists_every_fewstep_node_with_description_and_tooltips(comfy_server):
    object_info = comfy_server.get("/object_info")
    ours = {name: info for name, info in object_info.items() if name.startswith(FEWSTEP_NODE_PREFIX)}
    assert {"FewStepScheduler", "FewStepSampler"} <= set(ours)
    for name, info in ours.items():
        assert info["description"], f"{name} has no description"
        assert info["category"].startswith(("sampling/few-step", "loaders/few-step")), name
        for category in ("required", "optional"):
            for input_name, spec in info["input"].get(category, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_pack_loads_without_errors_or_warnings_of_its_own(comfy_server):
    log = comfy_server.log_text()
    pack_lines = [line for line in log.splitlines() if "ComfyUI-FewStep" in line]
    # ComfyUI prints one timing line per custom-node folder; anything else about us is a problem.
    assert any("custom_nodes/ComfyUI-FewStep" in line for line in pack_lines), log[-2000:]
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Traceback" in line or "Skip" in line]


def _diffusers_unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny.diffusers_dir / "unet"))


def _forward_inputs(tiny):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([999.0, 259.0])
    context_dim = 2048 if tiny.base == "sdxl" else 768
    context = torch.randn(2, 77, context_dim, generator=generator)
    pooled = torch.randn(2, 1280, generator=generator)
    return x, timesteps, context, pooled


def _compare_forward(model_patcher, tiny) -> float:
    model = model_patcher.model
    x, timesteps, context, pooled = _forward_inputs(tiny)
    extra, adm = {}, None
    if tiny.base == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]] * 2)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        adm = model.encode_adm(pooled_output=pooled, width=64, height=64)
    with torch.no_grad():
        expected = _diffusers_unet(tiny)(x, timesteps, encoder_hidden_states=context, **extra).sample
        ours = model.diffusion_model(x, timesteps, context=context, y=adm)
    return (ours - expected).abs().max().item()


def test_unet_loader_detects_and_matches_diffusers(comfy, sd15, sdxl):
    for tiny, expected_class in ((sd15, "SD15"), (sdxl, "KOALA_700M")):
        (model,) = comfy.nodes.UNETLoader().load_unet(tiny.unet_name, "default")
        assert type(model.model.model_config).__name__ == expected_class
        assert _compare_forward(model, tiny) < 1e-5


def test_checkpoint_loader_detects_and_matches_diffusers(comfy, sd15, sdxl):
    import comfy.supported_models as supported

    for tiny in (sd15, sdxl):
        model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(tiny.checkpoint_name)
        family = supported.SDXL if tiny.base == "sdxl" else supported.SD15
        assert isinstance(model.model.model_config, family)
        assert _compare_forward(model, tiny) < 1e-5


def test_text_encoding_and_vae_decode_match_diffusers(comfy, sd15, sdxl):
    from diffusers_reference import DiffusersSide

    for tiny in (sd15, sdxl):
        model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(tiny.checkpoint_name)
        reference = DiffusersSide(tiny)
        (conditioning,) = comfy.nodes.CLIPTextEncode().encode(clip, "a red fox in the snow")
        with torch.no_grad():
            encoded = reference.pipe.encode_prompt("a red fox in the snow", device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        assert (conditioning[0][0] - encoded[0]).abs().max().item() < 1e-4
        if tiny.base == "sdxl":
            assert (conditioning[0][1]["pooled_output"] - encoded[2]).abs().max().item() < 1e-4

        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        (image,) = comfy.nodes.VAEDecode().decode(vae, {"samples": latent})
        with torch.no_grad():
            # ComfyUI latents are the VAE's raw latents: diffusers' latents / scaling_factor.
            decoded = reference.pipe.vae.decode(latent).sample
        expected = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # ComfyUI's IMAGE: BHWC in [0, 1]
        assert (image - expected).abs().max().item() < 1e-4
