"""What capturing compiled kernels does under each CUDA allocator, each case in a fresh process.

    python3 bench/capture_probe.py            # CUDA only; prints one line per case and allocator

Cases, each on a small convolution block compiled by Inductor:
- `unpatched`: torch.cuda.graph around the compiled function as is. Under cudaMallocAsync the
  Triton launchers' pointer check fails during capture; the process may then die freeing the
  capture's memory (the exit code says).
- `by_address`: FewStepAccelerate's CapturedGraph (fewstep.acceleration.graphs), which captures
  compiled kernels with their addresses; its output is compared with eager.
- `failed_kept`: a function that waits on the GPU inside (a host sync, which no capture takes), through
  GraphCache: refused in its warm-up, before any capture; the process must go on and compute.
- `invalidated`: a raw capture broken off half-way by such a sync, the error kept as GraphCache keeps
  failed captures: what PyTorch does with the capture's memory under each allocator.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
CASES = ("unpatched", "by_address", "failed_kept", "invalidated")
ALLOCATORS = ("native", "cudaMallocAsync")


def block():
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU(),
                                 torch.nn.Conv2d(64, 64, 3, padding=1)).cuda().half().eval()
    return module, torch.randn(2, 64, 32, 32, device="cuda", dtype=torch.half)


def run_case(case: str) -> str:
    import torch

    sys.path.insert(0, str(PACK_ROOT / "testing"))
    import pack  # noqa: F401 — registers the pack as `comfyui_fewstep`
    from comfyui_fewstep.fewstep.acceleration import agreement, graphs

    module, x = block()
    with torch.inference_mode():
        eager = module(x)
        if case == "unpatched":
            compiled = torch.compile(module, dynamic=False)
            for _ in range(3):
                compiled(x)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = compiled(x)
            except Exception as error:
                return f"capture failed: {graphs.first_line(error)}"
            graph.replay()
            return f"captured; {agreement(out, eager)}"
        if case == "by_address":
            from comfyui_fewstep.fewstep.acceleration import compile_for_one_shape

            compiled = compile_for_one_shape(module)
            compiled(x)  # compiles here; FewStepAccelerate does this on its compile worker
            captured = graphs.CapturedGraph(compiled, [x], module, torch.cuda.graph_pool_handle(), True, compiled=True)
            return f"captured; {agreement(captured([x]).clone(), eager)}"
        def syncs_inside(value):
            hidden = module(value)
            return hidden * float(hidden.sum().item())  # a host sync: not capturable

        if case == "invalidated":
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    syncs_inside(x)
            except Exception as error:
                graphs.FAILED_CAPTURES_KEPT.append(error)
                outcome = f"capture failed: {graphs.first_line(error)}"
            torch.cuda.synchronize()
            return f"{outcome}; then eager {agreement(module(x), eager)}"
        cache = graphs.GraphCache("probe")

        result = cache.run(("probe",), syncs_inside, [x], module)
        after = module(x)  # the process goes on computing
        return (f"GraphCache returned {'a graph output' if result is not None else 'None (eager)'}; "
                f"failures {list(cache.failures.values())}; kept {len(graphs.FAILED_CAPTURES_KEPT)}; "
                f"then eager {agreement(after, eager)}")


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] in CASES:
        print(f"RESULT {run_case(sys.argv[1])}", flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("capture_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    for allocator in ALLOCATORS:
        for case in CASES:
            env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": f"backend:{allocator}"}
            run = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, env=env, timeout=600)
            results = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            tail = (run.stderr.strip().splitlines() or [""])[-1][:300]
            if run.returncode != 0:
                print(f"--- stderr of {allocator} {case} ---\n{run.stderr[-6000:]}", file=sys.stderr)
            print(f"{allocator:16} {case:12} exit {run.returncode:4}  {results[0] if results else 'no result'}"
                  f"{'' if run.returncode == 0 else f'  | stderr: {tail}'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
