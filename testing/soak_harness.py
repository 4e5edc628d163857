"""Many prompts from several websocket clients against one real ComfyUI server (`main.py --cpu`)
with FewStep loaded: the prompts of every family, the client, the run and its report. Used by
bench/soak.py (the full soak) and by the soak and robustness tests."""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# (family, steps, denoise): each family at its card's step count, and img2img rows (denoise < 1).
SOAK_CASES = [
    ("lcm", 4, 1.0), ("tcd", 4, 1.0), ("turbo", 1, 1.0), ("lightning", 4, 1.0), ("hyper_sd", 8, 1.0),
    ("hyper_sd_1step", 1, 1.0), ("dmd2", 4, 1.0), ("lcm", 4, 0.6), ("turbo", 2, 0.5), ("lightning", 4, 0.5),
]
IMAGE_SIZE = 64  # an 8×8 latent: the soak is about the server, not the pixels
OUTPUT_PREFIX = "fewstep_soak"


@dataclass
class PromptOutcome:
    """What the server said about one prompt: the HTTP answer to POST /prompt, then its websocket events."""

    http_status: int
    body: dict
    prompt_id: str | None = None
    error: dict | None = None  # the execution_error event's data
    succeeded: bool = False
    history: dict | None = None
    seconds: float = 0.0


async def submit_and_wait(session, ws, url: str, client_id: str, prompt: dict, timeout: float) -> PromptOutcome:
    """POST one prompt with `client_id`, then read `ws` (that client's socket) until ComfyUI is done with it.

    ComfyUI sends `executing` with node None to the prompt's client after it has stored the prompt's
    history, for successes and failures alike; execution_success / execution_error come before it.
    """
    started = time.monotonic()
    async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            return PromptOutcome(response.status, body, seconds=time.monotonic() - started)
    outcome = PromptOutcome(200, body, prompt_id=body["prompt_id"])
    import aiohttp

    async with asyncio.timeout(timeout):
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # binary frames are previews
            event = json.loads(message.data)
            data = event.get("data") or {}
            if data.get("prompt_id") != outcome.prompt_id:
                continue
            if event["type"] == "execution_error":
                outcome.error = data
            elif event["type"] == "execution_success":
                outcome.succeeded = True
            elif event["type"] == "executing" and data.get("node") is None:
                break
        else:
            raise ConnectionError("the server closed the websocket")
    async with session.get(f"{url}/history/{outcome.prompt_id}") as response:
        outcome.history = (await response.json()).get(outcome.prompt_id)
    outcome.seconds = time.monotonic() - started
    return outcome


async def run_one(url: str, prompt: dict, timeout: float = 300) -> PromptOutcome:
    """One prompt on a fresh client connection."""
    import aiohttp

    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            return await submit_and_wait(session, ws, url, client_id, prompt, timeout)


# ComfyUI's own nearest route per family, for the control run (--route native): what the server's
# memory does under the same load without FewStep's nodes.
NATIVE_SAMPLERS = {"lcm": "lcm", "tcd": "lcm", "turbo": "euler_ancestral", "lightning": "euler",
                   "hyper_sd": "ddim", "hyper_sd_1step": "lcm", "dmd2": "lcm"}


def soak_prompt(tiny, index: int, route: str = "fewstep") -> dict:
    """Prompt `index` of the soak: FewStep scheduler + sampler in SamplerCustom, decoded and saved.

    route "native" swaps them for ComfyUI's KSampler with the nearest native sampler (the control).
    """
    family, steps, denoise = SOAK_CASES[index % len(SOAK_CASES)]
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny.checkpoint_name}},
        "pos": {"class_type": "CLIPTextEncode",
                "inputs": {"text": f"a red fox in the snow, {family}", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1}},
        "sigmas": {"class_type": "FewStepScheduler",
                   "inputs": {"model": ["ckpt", 0], "family": family, "steps": steps, "denoise": denoise}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": family}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": True, "noise_seed": index, "cfg": 1.0,
            "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage",
                 "inputs": {"images": ["decode", 0], "filename_prefix": f"{OUTPUT_PREFIX}/{index:05d}"}},
    }
    if route == "native":
        del prompt["sigmas"], prompt["sampler"]
        prompt["sample"] = {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": index, "steps": steps, "cfg": 1.0,
            "sampler_name": NATIVE_SAMPLERS[family], "scheduler": "sgm_uniform", "positive": ["pos", 0],
            "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": denoise}}
    return prompt


@dataclass
class SoakReport:
    prompts: int
    clients: int
    warmup: int
    outcomes: list[PromptOutcome] = field(default_factory=list)
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (prompts completed, bytes)
    rss_start: int = 0
    leftover_files: list[str] = field(default_factory=list)
    saved_images: int = 0
    wall_seconds: float = 0.0
    timed_out: bool = False

    @property
    def completed(self) -> int:
        return sum(o.succeeded for o in self.outcomes)

    @property
    def failures(self) -> list[PromptOutcome]:
        return [o for o in self.outcomes if not o.succeeded]

    def rss_at(self, completed: int) -> int:
        return next(rss for n, rss in self.rss_samples if n >= completed)

    @property
    def rss_after_warmup(self) -> int:
        return self.rss_at(self.warmup)

    @property
    def rss_end(self) -> int:
        return self.rss_samples[-1][1]

    @property
    def slope_mib_per_100(self) -> float:
        """Least-squares slope of RSS over prompts completed after warm-up, MiB per 100 prompts."""
        points = [(n, rss) for n, rss in self.rss_samples if n >= self.warmup]
        if len(points) < 2:
            return 0.0
        mean_n = sum(n for n, _ in points) / len(points)
        mean_rss = sum(rss for _, rss in points) / len(points)
        covariance = sum((n - mean_n) * (rss - mean_rss) for n, rss in points)
        variance = sum((n - mean_n) ** 2 for n, _ in points)
        return covariance / variance * 100 / 2**20

    def summary(self) -> str:
        mib = 2**20
        latencies = sorted(o.seconds for o in self.outcomes)
        if not latencies or len(self.rss_samples) <= self.warmup:
            return f"only {len(self.outcomes)} of {self.prompts} prompts answered" + (
                " before the timeout" if self.timed_out else "")
        lines = [
            f"prompts: {self.completed}/{self.prompts} completed from {self.clients} concurrent clients "
            f"in {self.wall_seconds:.1f} s (median {latencies[len(latencies) // 2]:.2f} s per prompt, "
            f"p95 {latencies[int(len(latencies) * 0.95)]:.2f} s, queueing included)",
            f"server RSS: start {self.rss_start / mib:.1f} MiB, after {self.warmup} warm-up prompts "
            f"{self.rss_after_warmup / mib:.1f} MiB, end {self.rss_end / mib:.1f} MiB "
            f"(+{(self.rss_end - self.rss_after_warmup) / mib:.1f} MiB after warm-up); "
            f"slope after warm-up {self.slope_mib_per_100:+.2f} MiB per 100 prompts",
            *(["TIMED OUT before every prompt was answered"] if self.timed_out else []),
            f"saved images: {self.saved_images}; files left beyond them in temp/, output/ and the "
            f"server's TMPDIR: {len(self.leftover_files)}" + (f" {self.leftover_files[:10]}" if self.leftover_files else ""),
        ]
        for failure in self.failures[:5]:
            lines.append(f"FAILED: HTTP {failure.http_status} {json.dumps(failure.error or failure.body)[:500]}")
        return "\n".join(lines)


def list_files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


def expected_outputs(outcomes: list[PromptOutcome], output_dir: Path) -> set[Path]:
    """The files each prompt's /history says it saved."""
    files = set()
    for outcome in outcomes:
        for node_output in ((outcome.history or {}).get("outputs") or {}).values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    files.add(output_dir / image.get("subfolder", "") / image["filename"])
    return files


async def _soak(url: str, pid: int, tiny, prompts: int, clients: int, timeout: float, report: SoakReport,
                route: str, forget_history: bool) -> None:
    import aiohttp
    import psutil

    server = psutil.Process(pid)
    report.rss_start = server.memory_info().rss
    pending = list(range(prompts))

    async def client() -> None:
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                while pending:
                    index = pending.pop(0)
                    prompt = soak_prompt(tiny, index, route)
                    outcome = await submit_and_wait(session, ws, url, client_id, prompt, timeout)
                    report.outcomes.append(outcome)
                    if forget_history and outcome.prompt_id:
                        # What a long-running API client does once it has read a result.
                        async with session.post(f"{url}/history", json={"delete": [outcome.prompt_id]}):
                            pass
                    report.rss_samples.append((len(report.outcomes), server.memory_info().rss))

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(client() for _ in range(clients)))


def run_soak(server, tiny, prompts: int = 500, clients: int = 4, warmup: int | None = None,
             timeout: float = 1800, tmpdir: Path | None = None, route: str = "fewstep",
             forget_history: bool = False) -> SoakReport:
    """Run the soak against a started ComfyServer whose models/ holds `tiny`.

    ComfyUI keeps every prompt's history in memory (up to 10,000 entries); forget_history deletes
    each one after reading it, so that what is left of the RSS slope is not ComfyUI's history.
    """
    report = SoakReport(prompts, clients, warmup if warmup is not None else max(5, prompts // 10))
    base = server.base_directory
    folders = [base / "temp", base / "output"] + ([tmpdir] if tmpdir else [])
    before = set().union(*(list_files(folder) for folder in folders))
    started = time.monotonic()
    try:
        asyncio.run(_soak(server.url, server.process.pid, tiny, prompts, clients, timeout, report, route,
                          forget_history))
    except TimeoutError:
        report.timed_out = True
    report.wall_seconds = time.monotonic() - started
    saved = expected_outputs(report.outcomes, base / "output")
    report.saved_images = sum(path.is_file() for path in saved)
    after = set().union(*(list_files(folder) for folder in folders))
    report.leftover_files = sorted(str(path.relative_to(base) if base in path.parents else path)
                                   for path in after - before - saved)
    return report


def start_server(base: Path, tmpdir: Path):
    """A ComfyServer in `base` whose process writes its temporary files under `tmpdir`."""
    from comfy_harness import COMFYUI_PATH, ComfyServer

    tmpdir.mkdir(parents=True, exist_ok=True)
    server = ComfyServer(COMFYUI_PATH, base)
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)  # inherited by the server process only: set around its start
    try:
        server.start()
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous
    return server


def build_tiny_sd15(models_dir: Path):
    from comfy_harness import comfyui_on_path

    comfyui_on_path()  # building the model (once, then cached) uses comfy.utils
    import tiny_models

    return tiny_models.build_sd15(models_dir)
