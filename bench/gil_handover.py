"""What a busy compiling thread costs a prompt that hands the GIL over often, by switch interval.

Few-Step Accelerate compiles on a worker thread (Dynamo, AOTAutograd and Inductor are Python, busy for
minutes), while prompts go on running. A prompt drops the GIL at every wait for the GPU and at every C
call that releases it, and must then wait until the busy thread gives it back: up to Python's switch
interval (5 ms by default) each time. This times a stand-in prompt — `--handoffs` GIL releases with a
little Python between them — alone, then beside a busy thread at several switch intervals, among them
the one the compile worker sets while it runs a job (COMPILE_SWITCH_INTERVAL_S). CPU only; it measures
the hand-over, not a real prompt.

    python3 bench/gil_handover.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package

from comfyui_fewstep.fewstep.acceleration.background import COMPILE_SWITCH_INTERVAL_S  # noqa: E402


def busy(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for value in range(1000):
            total += value * value


def stand_in_prompt(handoffs: int) -> float:
    started = time.perf_counter()
    for _ in range(handoffs):
        time.sleep(0)  # releases the GIL, as a CUDA synchronisation does
        sum(range(200))
    return (time.perf_counter() - started) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handoffs", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    default = sys.getswitchinterval()
    print(f"| busy thread | switch interval | stand-in prompt ({args.handoffs} GIL hand-overs), median of {args.reps} |")
    print("|---|---|---|")
    print(f"| no | {default * 1e3:g} ms | {statistics.median(stand_in_prompt(args.handoffs) for _ in range(args.reps)):.1f} ms |")
    for interval in sorted({default, 0.001, COMPILE_SWITCH_INTERVAL_S}, reverse=True):
        sys.setswitchinterval(interval)
        stop = threading.Event()
        thread = threading.Thread(target=busy, args=(stop,), daemon=True)
        thread.start()
        time.sleep(0.05)
        try:
            times = [stand_in_prompt(args.handoffs) for _ in range(args.reps)]
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(default)
        label = " (the compile worker's)" if interval == COMPILE_SWITCH_INTERVAL_S else ""
        print(f"| yes | {interval * 1e3:g} ms{label} | {statistics.median(times):.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
