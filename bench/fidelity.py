"""How far ComfyUI's native few-step routes and FewStep's nodes are from the diffusers reference.

Runs both in real ComfyUI (in process, CPU) on the tiny random-weight SD1.5-family model, feeds the
diffusers reference the same weights and noise, and prints max |Δ| of the final latent in diffusers
latent units, per family; then the same for the flow-matching families on their tiny transformers
(bench/fidelity_flow.py). Usage: python bench/fidelity.py [--part sd|flow] [--families NAME ...]
(needs ComfyUI, see README)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
import tiny_models  # noqa: E402
from comfy_harness import COMFYUI_MISSING, COMFYUI_PATH, InProcessComfy  # noqa: E402
from diffusers_reference import DiffusersSide  # noqa: E402
from graphs import PROMPT, SEED, image_latent, latent_input, sampling_prompt, text_and_model  # noqa: E402

from fidelity_flow import print_flow_table, run_flow  # noqa: E402

# What a ComfyUI user does without FewStep, per family: the routes the cards' ComfyUI notes and
# ComfyUI's own examples give (TCD and Hyper-SD have no native sampler; the LCM sampler is the
# closest native choice).
NATIVE_ROUTES = {
    "lcm": ("lcm", "sgm_uniform"),
    "tcd": ("lcm", "sgm_uniform"),
    "turbo": ("euler_ancestral", "SDTurboScheduler"),
    "lightning": ("euler", "sgm_uniform"),
    "hyper_sd": ("ddim", "sgm_uniform"),
    "hyper_sd_1step": ("lcm", "sgm_uniform"),
    "hyper_sd_1step_unet": ("lcm", "sgm_uniform"),
    "dmd2": ("lcm", "sgm_uniform"),
}

CASES = [  # (family, steps, denoise): each family at its card's step count, plus img2img rows
    ("lcm", 4, 1.0), ("lcm", 4, 0.5), ("tcd", 4, 1.0), ("turbo", 1, 1.0), ("turbo", 4, 1.0),
    ("turbo", 2, 0.5), ("lightning", 4, 1.0), ("lightning", 4, 0.5), ("hyper_sd", 8, 1.0),
    ("hyper_sd_1step", 1, 1.0), ("hyper_sd_1step_unet", 1, 1.0), ("dmd2", 4, 1.0),
]


def native_prompt(tiny, family, steps, denoise, latent_file):
    sampler_name, scheduler = NATIVE_ROUTES[family]
    prompt = {**text_and_model(tiny, ""), "latent_in": latent_input(latent_file)}
    if scheduler == "SDTurboScheduler":
        prompt.update({
            "sigmas": {"class_type": "SDTurboScheduler",
                       "inputs": {"model": ["ckpt", 0], "steps": steps, "denoise": denoise}},
            "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}},
            "sample": {"class_type": "SamplerCustom", "inputs": {
                "model": ["ckpt", 0], "add_noise": True, "noise_seed": SEED, "cfg": 1.0,
                "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}},
        })
    else:
        prompt["sample"] = {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": SEED, "steps": steps, "cfg": 1.0, "sampler_name": sampler_name,
            "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent_in", 0], "denoise": denoise}}
    return prompt


def run_sd(comfy, families=None) -> list[tuple]:
    tiny = tiny_models.build_sd15(comfy.models_dir)
    reference = DiffusersSide(tiny)
    rows = []
    for family, steps, denoise in CASES:
        if families and family not in families:
            continue
        latent_file, latent = image_latent(comfy, tiny) if denoise < 1 else (None, None)
        _, expected = reference.sample(family, steps, denoise, PROMPT, SEED, image_latent=latent)
        deltas = []
        for prompt in (native_prompt(tiny, family, steps, denoise, latent_file),
                       sampling_prompt(tiny, family, steps, denoise, latent_file=latent_file)):
            ours = comfy.run(prompt).latent("save") * tiny.latent_scale
            deltas.append((ours - expected).abs().max().item())
        sampler_name, scheduler = NATIVE_ROUTES[family]
        rows.append((family, steps, denoise, f"{sampler_name} + {scheduler}", *deltas))
    return rows


def print_sd_table(rows) -> None:
    print("\nmax |Δ| of the final latent from the diffusers reference (diffusers latent units, "
          "tiny SD1.5-family model, fp32 CPU)\n")
    print("| family | steps | denoise | native ComfyUI route | native max abs diff | FewStep max abs diff |")
    print("|---|---|---|---|---|---|")
    for family, steps, denoise, route, native, ours in rows:
        print(f"| {family} | {steps} | {denoise:g} | {route} | {native:.3g} | {ours:.1e} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("sd", "flow"), help="only the SD1.5/SDXL or the flow-matching families")
    parser.add_argument("--families", nargs="+", metavar="NAME", help="only these families")
    options = parser.parse_args()
    if COMFYUI_PATH is None:
        print(COMFYUI_MISSING)
        return 1
    comfy = InProcessComfy(COMFYUI_PATH, Path(tempfile.mkdtemp(prefix="fewstep-fidelity-")))
    if options.part != "flow":
        print_sd_table(run_sd(comfy, options.families))
    if options.part != "sd":
        print_flow_table(run_flow(comfy, options.families))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
