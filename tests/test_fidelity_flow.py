"""bench/fidelity.py's flow half runs end to end: real ComfyUI, a family's native route and FewStep's, its
diffusers pipeline, the table README's Fidelity section shows.

SD3.5 Large Turbo only: its tiny MMDiT has ~1M parameters (the tiny FLUX, Qwen-Image and Z-Image have
hundreds of millions), so the run takes seconds. FewStep's column must stay within the parity bound of
tests/test_flow_parity.py; the native route (euler + sgm_uniform, cfg 1.2) spaces σ differently from
StableDiffusion3Pipeline and adds CFG, so it must not.
"""
from __future__ import annotations

import subprocess
import sys

from comfy_harness import PACK_ROOT, require_comfyui


PARITY_BOUND = 1e-3  # tests/test_flow_parity.py's bound on the final latent


def test_the_flow_table_has_the_native_route_beside_fewstep():
    require_comfyui()
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "fidelity.py"), "--part", "flow",
                          "--families", "sd35_large_turbo"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in run.stdout.splitlines()
            if line.startswith("| sd35_large_turbo |")]
    assert [(cells[1].strip(), cells[2].strip()) for cells in rows] == [("4", "1"), ("4", "1"), ("4", "0.5")]
    for cells in rows:
        assert "euler + sgm_uniform, cfg 1.2" in cells[4]
        native, fewstep = float(cells[-2]), float(cells[-1])
        assert fewstep <= PARITY_BOUND, cells
        assert native > 10 * PARITY_BOUND, cells
