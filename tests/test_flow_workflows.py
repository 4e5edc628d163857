"""The flow-matching families' example workflows (FLUX.1-schnell, SD3.5 Large Turbo, Qwen-Image-Lightning,
FLUX.1-Turbo-Alpha, Hyper-FLUX, Z-Image-Turbo) in real ComfyUI, on the CPU.

All six are validated by ComfyUI's own execution.validate_prompt, as the server does before it runs a
prompt (every node known, every link of the right type, every widget value allowed — the published file
names among the loaders' choices, the FewStep nodes' validate_inputs), with a tensor-less file under each
name.

None runs whole here, and that is the text encoders: ComfyUI builds T5-XXL (FLUX, SD3.5: 4.7B parameters),
Qwen2.5-VL 7B (Qwen-Image) and Qwen3-4B (Z-Image) from fixed full-size configs whatever the file holds, so
no tiny stand-in exists for them, and at full size each takes 10–30 GB and minutes per prompt on two CPU
cores. So the FLUX and Z-Image workflows run with their Text Encode nodes replaced by fixed conditioning
and everything after them as wired: tiny transformers under the published names, a FLUX VAE, a tiny LoRA
for the LoRA loader. SD3.5 Large Turbo (its checkpoint holds MMDiT and VAE) and Qwen-Image (Wan 2.1's VAE)
have no such stand-ins here and are validated only; their sampling runs in test_flow_parity.py (tiny
transformers, conditioning fed directly), and every workflow runs whole, at real size with random
weights, on a GPU (bench/workflow_gpu_check.py).
"""
from __future__ import annotations

import json

import pytest

import flow_conditioning
from comfy_harness import PACK_ROOT
from comfyui_fewstep.fewstep.families import FAMILIES, get_family
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt


def sampled_family(path) -> str:
    """The family the workflow's Few-Step Scheduler (or KSampler) is set to."""
    nodes = json.loads(path.read_text())["nodes"]
    (family,) = {node["widgets_values"][0 if node["type"] == "FewStepScheduler" else 2]
                 for node in nodes if node["type"] in ("FewStepScheduler", "FewStepKSampler")}
    return family


WORKFLOWS = sorted(path for path in (PACK_ROOT / "example_workflows").glob("*.json")
                   if get_family(sampled_family(path)).flow is not None)


def test_every_flow_family_has_an_example_workflow():
    flow_families = {name for name, family in FAMILIES.items() if family.flow is not None}
    assert {sampled_family(path) for path in WORKFLOWS} == flow_families


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.fixture
def placed_names(comfy):
    """Tensor-less files placed under the workflow's file names, removed afterwards (the session's other tests
    share these models folders)."""
    from workflow_models import place_file_names

    made = []
    yield lambda prompt: made.extend(place_file_names(prompt, comfy.base_directory))
    for relative in made:
        (comfy.models_dir / relative).unlink(missing_ok=True)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_flow_workflow_validates_against_comfyui(comfy, object_info, placed_names, path):
    prompt = ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
    placed_names(prompt)
    valid, error, node_errors = comfy.validate(prompt)
    assert valid, f"{path.name}: {error}\n{json.dumps(node_errors, indent=1)[:3000]}"


def test_validation_sees_a_file_name_the_loaders_do_not_list(comfy, object_info, placed_names):
    """The check above can fail: a workflow naming a file that is not there does not validate."""
    path = next(path for path in WORKFLOWS if sampled_family(path) == "flux_schnell")
    prompt = ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
    placed_names(prompt)
    (unet,) = [node for node in prompt.values() if node["class_type"] == "UNETLoader"]
    unet["inputs"]["unet_name"] = "flux1-schnell-not-downloaded.safetensors"
    valid, _error, node_errors = comfy.validate(prompt)
    assert not valid and "flux1-schnell-not-downloaded.safetensors" in json.dumps(node_errors)


def test_no_tiny_stand_in_is_offered_for_full_size_text_encoders(tmp_path, object_info):
    """The quick start's stand-ins refuse these workflows with the reason and the way out, rather than
    put an SD1.5 file under a FLUX name."""
    from workflow_models import install_stand_ins

    prompt = ui_workflow_to_prompt(json.loads(WORKFLOWS[0].read_text()), object_info)
    with pytest.raises(ValueError, match="--models"):
        install_stand_ins(prompt, tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.safetensors"))


# --- the FLUX and Z-Image workflows run, their text encoders stood in for -------------------------------


def unet_of(path) -> str:
    nodes = json.loads(path.read_text())["nodes"]
    (name,) = [node["widgets_values"][0] for node in nodes if node["type"] == "UNETLoader"]
    return name


# FLUX's (one tiny transformer for schnell, one for dev and its two LoRAs) and Z-Image's, in that order so
# one base is loaded at a time. SD3.5 Large Turbo's checkpoint and Qwen-Image's VAE (Wan 2.1's) have no
# tiny stand-in here: validated above, run at real size on the GPU.
RUN_FAMILIES = ("flux_schnell", "flux_turbo_alpha", "hyper_flux", "z_image_turbo")
RUNS = sorted((path for path in WORKFLOWS if sampled_family(path) in RUN_FAMILIES),
              key=lambda path: RUN_FAMILIES.index(sampled_family(path)))


@pytest.fixture(scope="module")
def stand_in_comfy(comfy):
    """In-process ComfyUI with the conditioning node; afterwards the stand-ins placed under published
    names go (the session's other tests share the models folders), and the tiny transformers with them."""
    import comfy.model_management as model_management

    harness = comfy
    harness.nodes.NODE_CLASS_MAPPINGS[flow_conditioning.NODE_NAME] = flow_conditioning.FewStepTestConditioning
    harness.placed, harness.loaded_base = [], None

    def release():
        harness.forget_outputs()  # the executor's cache holds the last prompt's MODEL
        model_management.unload_all_models()

    harness.release = release
    yield harness
    del harness.nodes.NODE_CLASS_MAPPINGS[flow_conditioning.NODE_NAME]
    for relative in harness.placed:
        (harness.models_dir / relative).unlink(missing_ok=True)
    release()


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_flow_workflow_runs_with_its_text_encoders_stood_in_for(stand_in_comfy, object_info, path):
    """Everything after the text encoders runs as the workflow wires it — UNETLoader on a tiny transformer
    under the published name, Few-Step LoRA Loader detecting the family from the LoRA's name, Flux
    Guidance, the latent's size reaching Few-Step Scheduler, SamplerCustom, the VAE decode — at 128²."""
    from PIL import Image
    from workflow_models import (CPU_TEST_SIZE, flow_base_of, install_flow_stand_ins, shrink_sizes,
                                 with_conditioning_stand_in)

    from comfyui_fewstep.fewstep.detection import detect_settings

    base = flow_base_of(unet_of(path))
    if stand_in_comfy.loaded_base not in (None, base):
        stand_in_comfy.release()  # one tiny transformer at a time (Z-Image's is 3.6 GB)
    stand_in_comfy.loaded_base = base
    prompt = ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
    stand_in_comfy.placed += install_flow_stand_ins(prompt, stand_in_comfy.base_directory)
    shrink_sizes(prompt)
    result = stand_in_comfy.run(with_conditioning_stand_in(prompt, flow_conditioning.NODE_NAME, base))

    (save,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    (image,) = result.files(save, "images")
    with Image.open(image) as picture:
        assert picture.size == (CPU_TEST_SIZE, CPU_TEST_SIZE)
    for node_id, node in prompt.items():
        if node["class_type"] == "FewStepLoraLoader":  # the family and steps its file name gives
            (settings,) = result.outputs[node_id]["fewstep_settings"]
            expected = detect_settings(node["inputs"]["lora_name"])
            assert (settings["family"], settings["steps"]) == (expected.family, expected.steps) == (
                sampled_family(path), get_family(sampled_family(path)).default_steps)
