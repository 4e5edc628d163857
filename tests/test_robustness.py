"""Every bad input to every FewStep node, through a real server's POST /prompt.

One real `main.py --cpu` server (shared by the module) with the tiny SD1.5 model. For each FewStep
node that GET /object_info lists, each of its inputs gets wrong types, NaN and infinities, numbers
outside its declared range, unknown options and files, links of the wrong type and a missing value;
then incompatible combinations. The server must answer with ComfyUI's validation error (HTTP 400,
node_errors naming the node and the input) or an execution error (websocket `execution_error` from
the node, its message naming the input, no traceback in it) — and keep serving: after every bad
prompt a valid one is run and must succeed.
"""
from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfy_harness import ComfyServer, require_comfyui

import soak_harness as soak  # the websocket client and the valid prompt the soak uses

# Every node the pack ships; test_every_fewstep_node_is_covered fails when one is missing here.
FEWSTEP_NODES = ["FewStepScheduler", "FewStepSampler", "FewStepLoraLoader", "FewStepUNetLoader", "FewStepKSampler",
                 "FewStepAccelerate", "FewStepPreviewImage"]
TRAILING_FAMILIES = ["turbo", "lightning", "hyper_sd", "dmd2"]  # img2img runs int(steps × denoise) steps
PICKLE_SUFFIXES = [".ckpt", ".pt", ".pth", ".bin"]

STYLE_LORA = "fewstep_test_style_lora.safetensors"  # fits the tiny SD1.5 UNet
SDXL_LORA = "fewstep_test_sdxl_lora.safetensors"  # keyed and shaped like an SDXL LoRA
TRUNCATED_LORA = "fewstep_test_truncated_lora.safetensors"
REMOVE = object()  # a case that deletes the input instead of setting it

# Gaps in the nodes that this suite found, by (node, input, case): they must still fail as listed
# (so the list stays true), and the test reports xfail until the node is fixed and the line removed.
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}


@dataclass
class Fixtures:
    server: ComfyServer
    tiny: object
    pickle_marker: Path
    valid_runs: int = 0


@pytest.fixture(scope="module")
def robust(tmp_path_factory) -> Fixtures:
    require_comfyui()
    base = tmp_path_factory.mktemp("robustness_base")
    tiny = soak.build_tiny_sd15(base / "models")
    marker = base / "pickle_was_loaded"
    write_test_files(base / "models", tiny, marker)
    with ComfyServer(require_comfyui(), base) as server:
        yield Fixtures(server, tiny, marker)


@pytest.fixture(scope="module")
def object_info(robust) -> dict:
    return robust.server.get("/object_info")


def write_test_files(models: Path, tiny, marker: Path) -> None:
    """LoRAs for the loaders (a fitting one, an SDXL one, a truncated one) and pickles that must never load."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    loras = models / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    # kohya keys on the tiny UNet's first cross-attention (320 channels, CLIP-L context 768).
    style = {}
    for projection, fan_in in (("to_q", 320), ("to_k", 768), ("to_v", 768)):
        key = f"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_{projection}"
        style[f"{key}.lora_down.weight"] = torch.randn(4, fan_in, generator=generator) * 0.01
        style[f"{key}.lora_up.weight"] = torch.randn(320, 4, generator=generator) * 0.01
        style[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(style, str(loras / STYLE_LORA))
    # SDXL's layout: cross-attention from the 2048-wide CLIP-L + CLIP-G context at 640 channels in
    # input_blocks.4, and text-encoder-2 (CLIP-G, 1280 wide) keys, which SD1.5 has no place for.
    sdxl = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0),
    }
    save_file(sdxl, str(loras / SDXL_LORA))
    data = (loras / STYLE_LORA).read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    (loras / TRUNCATED_LORA).write_bytes(data[: 8 + header_length + 100])  # header intact, tensors cut

    # Pickles whose unpickling creates `marker`: torch.load(weights_only=True) refuses them, a plain
    # torch.load runs the payload. The loaders must do neither.
    class Payload:
        def __reduce__(self):
            import os

            return os.mkdir, (str(marker),)

    for folder in ("loras", "diffusion_models", "checkpoints"):
        for suffix in PICKLE_SUFFIXES:
            (models / folder).mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": Payload()}, str(models / folder / f"fewstep_test_pickle{suffix}"))


# --- Prompts ----------------------------------------------------------------------------------


def upstream(tiny) -> dict:
    """Nodes every test graph can link from; ComfyUI ignores the ones no output needs."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny.checkpoint_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sigmas_in": {"class_type": "FewStepScheduler",
                      "inputs": {"model": ["ckpt", 0], "family": "lcm", "steps": 4, "denoise": 1.0}},
        "sampler_in": {"class_type": "FewStepSampler", "inputs": {"family": "lcm"}},
        "image_in": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    }


def link_for(input_type: str, input_name: str):
    links = {"MODEL": ["ckpt", 0], "CLIP": ["ckpt", 1], "VAE": ["ckpt", 2], "LATENT": ["latent", 0],
             "SIGMAS": ["sigmas_in", 0], "SAMPLER": ["sampler_in", 0], "IMAGE": ["image_in", 0]}
    if input_type == "CONDITIONING":
        return ["neg", 0] if "negative" in input_name else ["pos", 0]
    return links.get(input_type)


def input_specs(info: dict) -> dict[str, tuple[str, dict, bool]]:
    """name → (type, options, required) from /object_info; combos as ("COMBO", {"options": …})."""
    specs = {}
    for category in ("required", "optional"):
        for name, spec in info["input"].get(category, {}).items():
            kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            specs[name] = (kind, options, category == "required")
    return specs


def preferred_option(options: list, tiny) -> object:
    for name in (STYLE_LORA, tiny.unet_name, tiny.checkpoint_name):
        if name in options:
            return name
    return None


def node_graph(node: str, info: dict, tiny) -> dict:
    """A prompt whose output needs `node` (id "target") with every required input at a valid value."""
    inputs = {}
    for name, (kind, options, required) in input_specs(info).items():
        if not required:
            continue
        if kind == "COMBO":
            inputs[name] = preferred_option(options["options"], tiny) or options.get("default", options["options"][0])
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            inputs[name] = options.get("default", {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind])
        else:
            link = link_for(kind, name)
            if link is None:
                pytest.skip(f"{node}.{name}: no test source for a {kind} input; add one to link_for")
            inputs[name] = link
    graph = {**upstream(tiny), "target": {"class_type": node, "inputs": inputs}}
    if info["output"]:  # else the target is an output node itself
        # PreviewAny takes any type and is an output node, so ComfyUI validates and runs the target.
        graph["sink"] = {"class_type": "PreviewAny", "inputs": {"source": ["target", 0]}}
    return graph


def bad_values(kind: str, options: dict, name: str, required: bool) -> list[tuple[str, object]]:
    cases = []
    if kind in ("INT", "FLOAT"):
        cases += [("not a number", "abc"), ("NaN", math.nan), ("infinity", math.inf)]
        if kind == "FLOAT":
            cases.append(("-infinity", -math.inf))
        if options.get("min") is not None:
            cases.append(("below min", options["min"] - 1))
        if options.get("max") is not None:
            cases.append(("above max", options["max"] + 1))
    elif kind == "COMBO":
        cases += [("unknown option", "fewstep_test_missing.safetensors"), ("not a string", 12345)]
    elif kind not in ("STRING", "BOOLEAN"):  # a link
        cases.append(("link of the wrong type", ["ckpt", 0] if kind != "MODEL" else ["latent", 0]))
    if required:
        cases.append(("missing", REMOVE))
    return cases


# --- Checking answers -------------------------------------------------------------------------


def run(robust: Fixtures, prompt: dict) -> soak.PromptOutcome:
    return asyncio.run(soak.run_one(robust.server.url, prompt, timeout=300))


def refusal_problem(outcome: soak.PromptOutcome, node_id: str, input_names: tuple[str, ...]) -> str | None:
    """None if the server refused the prompt the way a user can act on; else what was wrong."""
    if outcome.http_status == 400:
        node_errors = outcome.body.get("node_errors") or {}
        errors = [e for errors in node_errors.values() for e in errors.get("errors", [])]
        inner = [e for e in errors if e.get("type") == "exception_during_inner_validation"]
        if inner:
            return f"validation crashed (traceback in the answer): {inner[0].get('details')}"
        if node_id not in node_errors:
            return f"HTTP 400 blames {sorted(node_errors)} instead of {node_id}: {outcome.body.get('error')}"
        for error in node_errors[node_id]["errors"]:
            text = f"{error.get('details', '')} {error.get('message', '')}"
            if error.get("extra_info", {}).get("input_name") in input_names or any(n in text for n in input_names):
                return None
        return f"HTTP 400 for {node_id} names none of {input_names}: {node_errors[node_id]['errors']}"
    if outcome.http_status != 200:
        return f"HTTP {outcome.http_status}: {outcome.body}"
    if outcome.error is None:
        return "accepted and ran without an error" if outcome.succeeded else "no answer"
    message = str(outcome.error.get("exception_message", ""))
    if outcome.error.get("node_id") != node_id:
        return f"execution error from {outcome.error.get('node_type')} instead of {node_id}: {message[:300]}"
    if "Traceback" in message or 'File "' in message:
        return f"traceback in the message: {message[:300]}"
    if not any(name in message for name in input_names):
        return f"the message names none of {input_names}: {message[:300]}"
    return None


def sampling_prompt(tiny, index: int) -> dict:
    """The soak's prompt for seed `index`, saving the latent: it samples for real, without the VAE's cost."""
    prompt = soak.soak_prompt(tiny, index)
    del prompt["decode"]
    prompt["save"] = {"class_type": "SaveLatent",
                      "inputs": {"samples": ["sample", 0], "filename_prefix": "fewstep_robustness"}}
    return prompt


def assert_still_serving(robust: Fixtures) -> None:
    """The next valid prompt (a new seed, so it really samples) succeeds."""
    robust.valid_runs += 1
    outcome = run(robust, sampling_prompt(robust.tiny, 10_000 + robust.valid_runs))
    assert outcome.http_status == 200 and outcome.succeeded, (outcome.body, outcome.error)


def fewstep_node(object_info: dict, node: str) -> dict:
    if node not in object_info:
        pytest.skip(f"{node} is not in /object_info (its branch has not landed)")
    return object_info[node]


# --- Every input of every node ----------------------------------------------------------------


def test_every_fewstep_node_is_covered(object_info):
    ours = {name for name in object_info if name.startswith("FewStep")}
    assert {"FewStepScheduler", "FewStepSampler"} <= ours
    assert ours <= set(FEWSTEP_NODES), f"add {ours - set(FEWSTEP_NODES)} to FEWSTEP_NODES"


@pytest.mark.parametrize("node", FEWSTEP_NODES)
def test_bad_value_for_every_input_is_refused_and_the_server_keeps_serving(robust, object_info, node):
    info = fewstep_node(object_info, node)
    base_graph = node_graph(node, info, robust.tiny)
    valid = run(robust, base_graph)
    assert valid.succeeded, f"the unmodified {node} graph must run: {valid.body} {valid.error}"

    problems, known = [], []
    for name, (kind, options, required) in input_specs(info).items():
        for label, value in bad_values(kind, options, name, required):
            graph = {key: {**node_def, "inputs": dict(node_def["inputs"])} for key, node_def in base_graph.items()}
            if value is REMOVE:
                graph["target"]["inputs"].pop(name, None)
            else:
                graph["target"]["inputs"][name] = value
            problem = refusal_problem(run(robust, graph), "target", (name,))
            gap = KNOWN_GAPS.get((node, name, label))
            if gap and problem:
                known.append(f"{name} = {value!r} ({label}): {gap}")
            elif gap:
                problems.append(f"{name} ({label}) is fixed: remove it from KNOWN_GAPS")
            elif problem:
                problems.append(f"{name} = {value!r} ({label}): {problem}")
            assert_still_serving(robust)
    assert not problems, "\n".join(problems)
    if known:
        pytest.xfail("known gaps in the node:\n" + "\n".join(known))


# --- Explicit cases ---------------------------------------------------------------------------


def scheduler_prompt(tiny, family="lcm", steps=4, denoise=1.0, **scheduler_inputs) -> dict:
    prompt = sampling_prompt(tiny, 0)
    prompt["sigmas"]["inputs"].update(family=family, steps=steps, denoise=denoise, **scheduler_inputs)
    prompt["sampler"]["inputs"]["family"] = family
    return prompt


@pytest.mark.parametrize("timesteps", ["999, abc", "2000", "999, 999", "259, 999", "-1", "999;759"])
def test_unusable_explicit_timesteps_are_refused(robust, timesteps):
    outcome = run(robust, scheduler_prompt(robust.tiny, timesteps=timesteps))
    assert refusal_problem(outcome, "sigmas", ("timesteps",)) is None, (outcome.body, outcome.error)
    assert_still_serving(robust)


@pytest.mark.parametrize("family", TRAILING_FAMILIES)
def test_img2img_with_no_step_left_on_a_trailing_family_is_refused(robust, object_info, family):
    """steps × denoise < 1 keeps no step of a trailing schedule (diffusers' img2img get_timesteps)."""
    outcome = run(robust, scheduler_prompt(robust.tiny, family, steps=1, denoise=0.5))
    assert refusal_problem(outcome, "sigmas", ("steps", "denoise")) is None, (outcome.body, outcome.error)
    text = str(outcome.body)
    assert "denoise ≥" in text or "raise steps" in text, "the message should say how to fix it"
    if "FewStepKSampler" in object_info:
        graph = node_graph("FewStepKSampler", object_info["FewStepKSampler"], robust.tiny)
        graph["target"]["inputs"].update(family=family, steps=1, denoise=0.5)
        outcome = run(robust, graph)
        assert refusal_problem(outcome, "target", ("steps", "denoise")) is None, (outcome.body, outcome.error)
    assert_still_serving(robust)


@pytest.mark.parametrize("family", TRAILING_FAMILIES)
def test_steps_above_the_declared_maximum_are_refused_for_every_family(robust, family):
    outcome = run(robust, scheduler_prompt(robust.tiny, family, steps=51))
    try:
        assert refusal_problem(outcome, "sigmas", ("steps",)) is None, (outcome.body, outcome.error)
    finally:
        assert_still_serving(robust)


def x0_prompt(tiny, family: str, steps: int) -> dict:
    """The tiny UNet made an x0-prediction model the way the README says (ModelSamplingDiscrete x0)."""
    prompt = scheduler_prompt(tiny, family, steps=steps)
    prompt["x0"] = {"class_type": "ModelSamplingDiscrete",
                    "inputs": {"model": ["ckpt", 0], "sampling": "x0", "zsnr": False}}
    prompt["sigmas"]["inputs"]["model"] = ["x0", 0]
    prompt["sample"]["inputs"]["model"] = ["x0", 0]
    return prompt


def test_x0_model_runs_with_the_family_it_was_distilled_for(robust):
    """SDXL-Lightning's 1-step UNet predicts x0 and is sampled as lightning with 1 step."""
    outcome = run(robust, x0_prompt(robust.tiny, "lightning", 1))
    assert outcome.succeeded, (outcome.body, outcome.error)


def test_x0_model_with_the_lcm_family_is_refused(robust):
    outcome = run(robust, x0_prompt(robust.tiny, "lcm", 4))
    try:
        problems = [refusal_problem(outcome, node, ("family",)) for node in ("sigmas", "sampler")]
        assert None in problems, problems
    finally:
        assert_still_serving(robust)


# --- Loaders: files -----------------------------------------------------------------------------


def loader_graph(robust: Fixtures, object_info: dict, node: str, file_value: str) -> tuple[dict, str]:
    """`node`'s graph with its file input set to `file_value`; returns (graph, that input's name)."""
    info = fewstep_node(object_info, node)
    graph = node_graph(node, info, robust.tiny)
    file_inputs = [name for name, (kind, options, _) in input_specs(info).items()
                   if kind == "COMBO" and preferred_option(options["options"], robust.tiny)]
    assert file_inputs, f"{node} has no file input listing the test files"
    graph["target"]["inputs"][file_inputs[0]] = file_value
    return graph, file_inputs[0]


def test_sdxl_lora_on_an_sd15_model_is_refused(robust, object_info):
    graph, file_input = loader_graph(robust, object_info, "FewStepLoraLoader", SDXL_LORA)
    outcome = run(robust, graph)
    assert refusal_problem(outcome, "target", (file_input, SDXL_LORA)) is None, (outcome.body, outcome.error)
    assert "SDXL" in str(outcome.body) + str(outcome.error), "the message should say the LoRA is for SDXL"
    assert_still_serving(robust)


def test_truncated_lora_file_is_refused(robust, object_info):
    graph, file_input = loader_graph(robust, object_info, "FewStepLoraLoader", TRUNCATED_LORA)
    outcome = run(robust, graph)
    assert refusal_problem(outcome, "target", (file_input, TRUNCATED_LORA)) is None, (outcome.body, outcome.error)
    assert_still_serving(robust)


@pytest.mark.parametrize("node", ["FewStepLoraLoader", "FewStepUNetLoader"])
@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_files_are_refused_and_never_unpickled(robust, object_info, node, suffix):
    """A .ckpt/.pt/.pth/.bin file is refused by name; its pickle payload never runs."""
    name = f"fewstep_test_pickle{suffix}"
    graph, file_input = loader_graph(robust, object_info, node, name)
    outcome = run(robust, graph)
    assert not robust.pickle_marker.exists(), f"{node} unpickled {name}: its payload ran"
    assert refusal_problem(outcome, "target", (file_input, name)) is None, (outcome.body, outcome.error)
    assert "safetensors" in str(outcome.body) + str(outcome.error), "the message should point to .safetensors"
    assert_still_serving(robust)


def test_server_is_healthy_after_the_suite(robust):
    """Last in the module: nothing queued or stuck, and the server process is the one we started."""
    assert robust.server.process.poll() is None
    queue = robust.server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert_still_serving(robust)
