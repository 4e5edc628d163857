"""UI-format workflows → API prompts, checked by the real server accepting them."""
import json
from pathlib import Path

import pytest

from comfyui_fewstep.fewstep.workflow_api import WorkflowError, ui_workflow_to_prompt


def comfyui_default_workflow() -> dict:
    """ComfyUI's own default workflow, as the templates package ships it."""
    templates = pytest.importorskip("comfyui_workflow_templates_media_image", reason="ComfyUI's templates package not installed")
    return json.loads((Path(templates.__file__).parent / "templates" / "default.json").read_text())


def test_default_workflow_becomes_the_prompt_comfyui_expects(comfy_server):
    object_info = comfy_server.get("/object_info")
    prompt = ui_workflow_to_prompt(comfyui_default_workflow(), object_info)
    sampler = next(node for node in prompt.values() if node["class_type"] == "KSampler")
    # widgets_values [seed, "randomize", 20, 8, "euler", "normal", 1]: the control value is skipped.
    assert {k: sampler["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "seed": 685468484323813, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1}
    assert sampler["inputs"]["model"] == ["4", 0]
    assert "MarkdownNote" not in {node["class_type"] for node in prompt.values()}
    # The server validates it up to the missing checkpoint file, and no further.
    status, body = comfy_server.queue(prompt)
    assert status == 400
    errors = [e for node in body["node_errors"].values() for e in node["errors"]]
    assert [e["extra_info"]["input_name"] for e in errors] == ["ckpt_name"]


def test_unknown_node_names_the_node_and_the_fix():
    workflow = {"nodes": [{"id": 7, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowError, match="#7 'NoSuchNode'.*Install Missing Custom Nodes"):
        ui_workflow_to_prompt(workflow, {})
