"""Prompts timed as a websocket client of a real ComfyUI server sees them, phase by phase."""
from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
import uuid

# Phases of one prompt, client side, in ms from the POST: the POST's answer (validation and queueing),
# the server starting it, its output node's `executed` message (the image's file name reaches the
# client: the image is ready), and the prompt's end (history written, `executing` with node None).
PHASES = ("queued", "started", "image", "done")


class TimedClient:
    """One websocket connection to a ComfyUI server, kept open across prompts (as the frontend does)."""

    def __init__(self, server):
        self.server = server
        self.client_id = uuid.uuid4().hex
        self.loop = asyncio.new_event_loop()
        self.session = self.ws = None
        self.loop.run_until_complete(self._connect())

    async def _connect(self):
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(f"{self.server.url}/ws?clientId={self.client_id}", max_msg_size=0)

    def close(self):
        self.loop.run_until_complete(self.session.close())
        self.loop.close()

    def time_prompt(self, prompt: dict, output_node: str, timeout: float = 1200) -> dict:
        """Queue `prompt`, wait for it; phase times in ms since the POST, or `error`."""
        return self.loop.run_until_complete(asyncio.wait_for(self._time(prompt, output_node), timeout))

    async def _time(self, prompt: dict, output_node: str) -> dict:
        import aiohttp

        posted = time.perf_counter()
        status, body = await self.loop.run_in_executor(None, self.server.queue, prompt, self.client_id)
        times = {"queued": (time.perf_counter() - posted) * 1e3}
        if status != 200:
            return {**times, "error": json.dumps(body)[:500]}
        prompt_id = body["prompt_id"]
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # binary: previews, progress text
            event = json.loads(message.data)
            data = event.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            now = (time.perf_counter() - posted) * 1e3
            if event["type"] == "execution_start":
                times["started"] = now
            elif event["type"] == "executed" and data.get("node") == output_node:
                times["image"] = now
            elif event["type"] == "execution_error":
                return {**times, "error": str(data.get("exception_message", data))[:500]}
            elif event["type"] == "executing" and data.get("node") is None:
                times["done"] = now
                return times
        return {**times, "error": "websocket closed"}


def summary(runs: list[dict]) -> dict:
    """Median of each phase over the runs that completed, and how many did."""
    completed = [run for run in runs if "error" not in run]
    result = {"prompts": len(runs), "completed": len(completed), "errors": [r["error"] for r in runs if "error" in r][:3]}
    for phase in PHASES:
        values = [run[phase] for run in completed if phase in run]
        result[f"{phase}_ms"] = round(statistics.median(values), 2) if values else None
    return result


def process_gpu_memory_mib(pid: int) -> float | None:
    """The GPU memory nvidia-smi reports for process `pid` (what the user sees), in MiB."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return None
