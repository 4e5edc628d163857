"""Soak: many prompts from several clients at once against one real ComfyUI server with FewStep loaded.

Starts `main.py --cpu` on 127.0.0.1 in a throwaway base directory with the tiny random-weight SD1.5
model, then N prompts (every family, text-to-image and image-to-image, each decoded and saved as an
image) come from C concurrent websocket clients. It prints the server's resident memory at start,
after warm-up and at the end, the slope after warm-up, and what the server left in its temp/,
output/ and TMPDIR beyond the images the prompts saved.

    python3 bench/soak.py [--prompts 500] [--clients 4] [--timeout 1800]

All traffic goes to 127.0.0.1; the run is bounded by the prompt count and by --timeout.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
from soak_harness import build_tiny_sd15, run_soak, start_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=None, help="prompts before the baseline (default 10%%)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    parser.add_argument("--route", choices=["fewstep", "native"], default="fewstep",
                        help="native: the same load through ComfyUI's KSampler, as a control")
    parser.add_argument("--forget-history", action="store_true",
                        help="delete each prompt's /history entry once read (isolates ComfyUI's history)")
    options = parser.parse_args()

    from comfy_harness import COMFYUI_MISSING, COMFYUI_PATH

    if COMFYUI_PATH is None:
        print(COMFYUI_MISSING)
        return 1
    base = Path(tempfile.mkdtemp(prefix="fewstep-soak-"))
    tiny = build_tiny_sd15(base / "models")
    server = start_server(base, base / "tmp")
    try:
        report = run_soak(server, tiny, options.prompts, options.clients, options.warmup, options.timeout,
                          tmpdir=base / "tmp", route=options.route, forget_history=options.forget_history)
    finally:
        server.stop()
    print(f"route: {options.route}{', history deleted after each prompt' if options.forget_history else ''}")
    print(report.summary())
    print(f"server log: {server.log_path}")
    return 0 if report.completed == options.prompts and not report.leftover_files else 1


if __name__ == "__main__":
    sys.exit(main())
