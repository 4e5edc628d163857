"""A short soak in CI: concurrent clients, every family, one real server (bench/soak.py runs the full 500).

What it catches in 36 prompts: a failed or lost prompt under concurrency, a temporary file left in
the server's temp/, output/ or TMPDIR, and a leak of about a MiB or more per prompt (a model patch,
a decoded image or a LoRA copy kept per prompt). Smaller leaks need the full run's slope.
"""
from __future__ import annotations


import pytest

from comfy_harness import require_comfyui

import soak_harness as soak

PROMPTS = 36
CLIENTS = 3
# Warm-up covers every row of soak.SOAK_CASES once (10), so every code path has run and allocated
# what it keeps (the model loaded, CLIP encodings cached) before the baseline is taken.
WARMUP = 12
# After warm-up the server's RSS may grow by at most this over the remaining 24 prompts: 1 MiB per
# prompt. The full 500-prompt runs grew 5.5 MiB per 100 prompts (ComfyUI's in-memory history and
# allocator noise); a leaked 64×64 image is 48 KiB, a leaked copy of the tiny UNet ~300 MiB.
MAX_GROWTH_AFTER_WARMUP_MIB = 24


@pytest.fixture(scope="module")
def soak_report(tmp_path_factory) -> soak.SoakReport:
    require_comfyui()
    base = tmp_path_factory.mktemp("soak_base")
    tiny = soak.build_tiny_sd15(base / "models")
    server = soak.start_server(base, base / "tmp")
    try:
        report = soak.run_soak(server, tiny, prompts=PROMPTS, clients=CLIENTS, warmup=WARMUP, timeout=900,
                               tmpdir=base / "tmp")
    finally:
        server.stop()
    print("\n" + report.summary())
    return report


def test_every_prompt_from_concurrent_clients_completes(soak_report):
    assert soak_report.completed == PROMPTS, soak_report.summary()
    assert soak_report.saved_images == PROMPTS


def test_no_temporary_files_are_left_behind(soak_report):
    assert soak_report.leftover_files == [], soak_report.summary()


def test_resident_memory_is_flat_after_warmup(soak_report):
    growth_mib = (soak_report.rss_end - soak_report.rss_after_warmup) / 2**20
    assert growth_mib < MAX_GROWTH_AFTER_WARMUP_MIB, soak_report.summary()
