"""The flow-matching families' example workflows (FLUX.1-schnell, SD3.5 Large Turbo, Qwen-Image-Lightning,
FLUX.1-Turbo-Alpha, Hyper-FLUX, Z-Image-Turbo) against real ComfyUI's node definitions, on the CPU.

Each is validated by ComfyUI's own execution.validate_prompt, as the server does before it runs a prompt
(every node known, every link of the right type, every widget value allowed — the published file names
among the loaders' choices, the FewStep nodes' validate_inputs), with an empty file under each name.

None of them runs here, and that is the text encoders: ComfyUI builds T5-XXL (FLUX, SD3.5: 4.7B
parameters), Qwen2.5-VL 7B (Qwen-Image) and Qwen3-4B (Z-Image) from fixed full-size configs whatever the
file holds, so no tiny stand-in exists for them, and at full size each takes 10–30 GB and minutes per
prompt on two CPU cores. The sampling they feed runs on the CPU in test_flow_parity.py (tiny transformers,
conditioning fed directly); the workflows run whole, at real size with random weights, on a GPU
(bench/, through the same file names).
"""
from __future__ import annotations

import json

import pytest

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
    """Empty files placed under the workflow's file names, removed afterwards (the session's other tests
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
