"""Timesteps against the numbers the model cards and the issue publish (ComfyUI-free)."""
import pytest

from comfyui_fewstep.fewstep.families import FAMILIES, FewStepInputError
from comfyui_fewstep.fewstep.schedules import DiscreteNoiseSchedule, parse_timesteps, reference_timesteps

PUBLISHED = [
    # LCM-LoRA cards (LCMScheduler, original_inference_steps 50).
    ("lcm", 4, 1.0, [999, 759, 499, 259]),
    # LatentConsistencyModelImg2ImgPipeline keeps 4 steps inside the strength window.
    ("lcm", 4, 0.5, [499, 379, 259, 139]),
    ("tcd", 4, 1.0, [999, 759, 499, 259]),
    # SDXL-Turbo / Lightning / Hyper-SD: trailing spacing (Lin et al., "Common Diffusion Noise
    # Schedules and Sample Steps are Flawed", table 2).
    ("turbo", 4, 1.0, [999, 749, 499, 249]),
    ("turbo", 1, 1.0, [999]),
    ("turbo", 2, 0.5, [499]),  # SDXL-Turbo img2img card: 2 steps, strength 0.5 → 1 step
    ("lightning", 4, 1.0, [999, 749, 499, 249]),
    ("lightning", 8, 1.0, [999, 874, 749, 624, 499, 374, 249, 124]),
    ("hyper_sd", 8, 1.0, [999, 874, 749, 624, 499, 374, 249, 124]),
    ("hyper_sd_1step", 1, 1.0, [999]),
    ("hyper_sd_1step_unet", 1, 1.0, [800]),  # Hyper-SDXL-1step-Unet card: timesteps=[800]
    ("dmd2", 4, 1.0, [999, 749, 499, 249]),  # DMD2 4-step card
    ("dmd2", 1, 1.0, [399]),  # DMD2 1-step card
]


@pytest.mark.parametrize("family,steps,denoise,expected", PUBLISHED)
def test_published_timesteps(family, steps, denoise, expected):
    assert reference_timesteps(family, steps, denoise) == expected


def test_every_family_has_a_schedule_for_its_default_steps():
    for family in FAMILIES.values():
        if family.flow is not None:
            continue  # σ by image size: test_flow_schedules.py
        timesteps = reference_timesteps(family.name, family.default_steps)
        assert len(timesteps) == family.default_steps


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sigmas_equal_diffusers_trailing_euler(steps):
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="trailing")
    euler.set_timesteps(steps)
    schedule = DiscreteNoiseSchedule.reference()
    sigmas = schedule.sigmas_for(reference_timesteps("lightning", steps))
    assert (sigmas - euler.sigmas).abs().max().item() < 1e-5
    assert [schedule.timestep(float(s)) for s in sigmas[:-1]] == [int(t) for t in euler.timesteps]


def test_explicit_timesteps_are_run_as_given():
    assert reference_timesteps("lcm", 4, 1.0, parse_timesteps("999, 759, 499, 259")) == [999, 759, 499, 259]
    assert parse_timesteps("  ") is None


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: reference_timesteps("turbo", 2, 0.4), ["steps × denoise", "denoise ≥ 0.5"]),
        (lambda: reference_timesteps("lightning", 1, 0.5), ["steps × denoise", "denoise ≥ 1"]),
        (lambda: reference_timesteps("hyper_sd_1step_unet", 4), ["steps", "set steps to 1"]),
        (lambda: reference_timesteps("lcm", 30, 0.5), ["steps", "at most 25"]),
        (lambda: reference_timesteps("sdxl_turbo", 1), ["family", "'sdxl_turbo'", "lcm, tcd, turbo"]),
        (lambda: reference_timesteps("lcm", 4, 1.0, [999, 999]), ["timesteps", "strictly decrease"]),
        (lambda: reference_timesteps("lcm", 4, 1.0, [1000, 10]), ["timesteps", "0–999"]),
        (lambda: reference_timesteps("lcm", 2, 0.5, [999, 10]), ["denoise", "explicit timesteps"]),
        (lambda: parse_timesteps("999, x"), ["timesteps", "whole numbers"]),
    ],
)
def test_bad_input_names_the_input_and_the_fix(call, words):
    with pytest.raises(FewStepInputError) as error:
        call()
    for word in words:
        assert word in str(error.value)


def test_a_repeated_schedule_builds_its_diffusers_scheduler_once(monkeypatch):
    """ComfyUI validates every queued prompt, so the same schedule is asked for again and again: the
    diffusers scheduler is built the first time only, each caller gets its own list, and invalid
    arguments are refused every time (errors are not remembered as answers)."""
    from diffusers import schedulers as diffusers_schedulers

    from comfyui_fewstep.fewstep import schedules

    built = []

    def counting(from_config):
        def build(cls, *args, **kwargs):
            built.append(cls.__name__)
            return from_config(cls, *args, **kwargs)
        return classmethod(build)

    for name in ("DDIMScheduler", "LCMScheduler"):
        scheduler_class = getattr(diffusers_schedulers, name)
        monkeypatch.setattr(scheduler_class, "from_config", counting(scheduler_class.from_config.__func__))
    schedules._family_timesteps.cache_clear()
    first = reference_timesteps("lightning", 4)
    first.append(-1)  # a caller's change must not reach the next caller
    assert reference_timesteps("lightning", 4) == [999, 749, 499, 249]
    assert reference_timesteps("lcm", 4, 0.5) == reference_timesteps("lcm", 4, 0.5) == [499, 379, 259, 139]
    assert built == ["DDIMScheduler", "LCMScheduler"]
    for _ in range(2):
        with pytest.raises(FewStepInputError, match="steps × denoise"):
            reference_timesteps("turbo", 2, 0.4)
