"""Bad scheduler/sampler input through the real server: a message naming the input and the fix,
where ComfyUI shows it (validation before running, or the node's execution error), and the server
keeps serving."""
from __future__ import annotations

import pytest

from comfy_harness import PromptFailed
from graphs import sampling_prompt


def validation_messages(body: dict, node_id: str) -> list[str]:
    errors = body["node_errors"][node_id]["errors"]
    return [f"{e['message']}: {e['details']}" for e in errors]


@pytest.mark.parametrize(
    "family,steps,denoise,words",
    [
        ("turbo", 2, 0.4, ["steps × denoise must be ≥ 1 for turbo", "denoise ≥ 0.5"]),
        ("hyper_sd_1step_unet", 4, 1.0, ["steps: 4", "set steps to 1"]),
        ("lcm", 40, 0.5, ["at most 25 steps"]),
        # A family name an older or foreign workflow saved: ComfyUI would only say "not in list".
        ("sdxl_lightning", 4, 1.0, ["family: 'sdxl_lightning' is not a FewStep family", "Choose one of: lcm"]),
    ],
)
def test_bad_constants_are_rejected_before_running(comfy_server, server_sd15, family, steps, denoise, words):
    prompt = sampling_prompt(server_sd15, family, steps, denoise)
    status, body = comfy_server.queue(prompt)
    assert status == 400
    text = "\n".join(validation_messages(body, "sigmas"))
    for word in words:
        assert word in text
    assert "Traceback" not in text


def test_bad_linked_value_fails_at_the_node_with_a_clear_message(comfy_server, server_sd15):
    # steps come from another node, so only execution can check them.
    prompt = sampling_prompt(server_sd15, "lightning", 1, 0.5)
    prompt["steps_from"] = {"class_type": "PrimitiveInt", "inputs": {"value": 1}}
    prompt["sigmas"]["inputs"]["steps"] = ["steps_from", 0]
    with pytest.raises(PromptFailed) as failure:
        comfy_server.run(prompt)
    details = failure.value.details
    assert details["node_id"] == "sigmas" and details["node_type"] == "FewStepScheduler"
    assert details["exception_message"].startswith("steps × denoise must be ≥ 1 for lightning")
    assert details["exception_type"].endswith("FewStepInputError")

    # The server keeps serving: the next valid prompt runs.
    history = comfy_server.run(sampling_prompt(server_sd15, "lightning", 2, 0.5))
    assert history["status"]["status_str"] == "success"
