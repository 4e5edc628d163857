"""Real ComfyUI for the tests: find it, run prompts in process through its executor, or run its server.

Both paths load this pack through ComfyUI's own custom-node loader from a throwaway base directory
(`--base-directory`), whose custom_nodes/ holds a link to the pack and whose models/ holds the tiny
models the tests build, so the user's ComfyUI install is never touched.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from pack import PACK_ROOT

PACK_FOLDER_NAME = "ComfyUI-FewStep"


def find_comfyui() -> Path | None:
    """COMFYUI_PATH, else ComfyUI two levels up (pack in ComfyUI/custom_nodes/<pack>), else ~/ComfyUI."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    candidates.append(Path.home() / "ComfyUI")
    for candidate in candidates:
        if (candidate / "main.py").is_file() and (candidate / "comfy").is_dir():
            return candidate.resolve()
    return None


COMFYUI_PATH = find_comfyui()
COMFYUI_MISSING = (
    "ComfyUI not found (set COMFYUI_PATH, clone the pack into ComfyUI/custom_nodes/, or put ComfyUI "
    "in ~/ComfyUI): ComfyUI-bound tests skipped"
)


def require_comfyui() -> Path:
    """ComfyUI's folder; in a test without ComfyUI, the test is skipped with COMFYUI_MISSING."""
    if COMFYUI_PATH is None:
        import pytest

        pytest.skip(COMFYUI_MISSING)
    return COMFYUI_PATH


def comfyui_on_path(comfyui_path: Path | None = None) -> Path:
    """Put ComfyUI first on sys.path, and the pack's root nowhere on it.

    ComfyUI's code does `import nodes` (its nodes.py); the pack has a package `nodes/`. With the pack's
    root on sys.path — `python -m pytest` run from it adds the working directory — the pack's would be
    found instead wherever it comes first. Entries are compared by the folder they resolve to.
    """
    comfyui_path = Path(comfyui_path or require_comfyui()).resolve()

    def resolves_to(entry: str, folder: Path) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == folder
        except OSError:
            return False

    sys.path[:] = [entry for entry in sys.path
                   if not resolves_to(entry, PACK_ROOT) and not resolves_to(entry, comfyui_path)]
    sys.path.insert(0, str(comfyui_path))
    imported = sys.modules.get("nodes")
    if imported is not None and Path(getattr(imported, "__file__", "") or "").resolve().parent.parent == PACK_ROOT:
        del sys.modules["nodes"]  # the pack's package, imported by its top-level name: not ComfyUI's
    return comfyui_path


def make_base_directory(base: Path) -> Path:
    """A ComfyUI base directory whose custom_nodes/ links to this pack."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/diffusion_models",
                "models/vae", "models/controlnet", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return base


class _StandInServer:
    """What PromptExecutor needs of PromptServer: it records the messages it is sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class InProcessComfy:
    """ComfyUI imported into the test process on CPU, with its real executor and node loader.

    One per test session: ComfyUI's module-level state (folder_paths, NODE_CLASS_MAPPINGS) is global.
    """

    def __init__(self, comfyui_path: Path, base_directory: Path, cpu: bool = True, fp32_text_encoders: bool = True):
        """`cpu`: ComfyUI's --cpu (else it picks CUDA where there is one). `fp32_text_encoders`:
        ComfyUI stores text encoders in fp16 even on the CPU; the fp32 diffusers comparisons need fp32."""
        self.comfyui_path = comfyui_path
        self.base_directory = make_base_directory(base_directory)
        comfyui_on_path(comfyui_path)
        from comfy.cli_args import args

        args.cpu = cpu  # before comfy.model_management is imported
        args.base_directory = str(self.base_directory)  # before folder_paths is imported
        args.disable_metadata = True
        args.fp32_text_enc = fp32_text_encoders
        import utils.install_util  # noqa: F401 — before `nodes` puts comfy/ (and comfy/utils.py) first
        import execution
        import nodes

        self.nodes = nodes
        self.execution = execution
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        import folder_paths

        self.folder_paths = folder_paths

    @property
    def models_dir(self) -> Path:
        return self.base_directory / "models"

    @property
    def output_dir(self) -> Path:
        return Path(self.folder_paths.get_output_directory())

    def _executor(self):
        # One executor with ComfyUI's default (classic) cache, as the server keeps: unchanged nodes
        # (checkpoint loading, text encoding) are not re-run between a test's prompts.
        if getattr(self, "_prompt_executor", None) is None:
            self._prompt_executor = self.execution.PromptExecutor(
                _StandInServer(), cache_type=self.execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
            )
        return self._prompt_executor

    def forget_outputs(self) -> None:
        """Drop the executor's cached outputs (loaded models among them), as a fresh server would have none."""
        self._prompt_executor = None

    def validate(self, prompt: dict) -> tuple[bool, dict | None, dict]:
        valid, error, _outputs, node_errors = asyncio.run(
            self.execution.validate_prompt(str(uuid.uuid4()), prompt, None)
        )
        return valid, error, node_errors

    def run(self, prompt: dict) -> "PromptResult":
        """Validate and execute an API-format prompt; raises PromptFailed on either failing."""
        valid, error, outputs, node_errors = asyncio.run(
            self.execution.validate_prompt(str(uuid.uuid4()), prompt, None)
        )
        if not valid:
            raise PromptFailed("validation", {"error": error, "node_errors": node_errors})
        executor = self._executor()
        executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        if not executor.success:
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            raise PromptFailed("execution", errors[0] if errors else {})
        return PromptResult(executor.history_result["outputs"], self.output_dir)


class PromptFailed(Exception):
    def __init__(self, stage: str, details: dict):
        self.stage = stage
        self.details = details
        super().__init__(f"{stage} failed: {json.dumps(details, default=str)[:4000]}")

    @property
    def message(self) -> str:
        """The text ComfyUI shows the user for this failure."""
        if self.stage == "execution":
            return str(self.details.get("exception_message", ""))
        parts = [json.dumps(self.details.get("error"), default=str)]
        for node in (self.details.get("node_errors") or {}).values():
            for error in node.get("errors", []):
                parts.append(f"{error.get('message')}: {error.get('details')}")
        return "\n".join(parts)


class PromptResult:
    def __init__(self, outputs: dict, output_dir: Path):
        self.outputs = outputs
        self.output_dir = output_dir

    def files(self, node_id: str, kind: str) -> list[Path]:
        return [
            self.output_dir / item.get("subfolder", "") / item["filename"]
            for item in self.outputs.get(node_id, {}).get(kind, [])
        ]

    def latent(self, node_id: str):
        """The LATENT a SaveLatent node wrote, read back with safetensors."""
        from safetensors.torch import load_file

        (path,) = self.files(node_id, "latents")
        return load_file(str(path))["latent_tensor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_with_parent() -> None:
    """In the server's process: get SIGTERM when the test process dies, so a killed test run
    leaves no server behind (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class ComfyServer:
    """`python main.py` (--cpu by default) on 127.0.0.1 as a subprocess, with this pack loaded from base_directory."""

    def __init__(self, comfyui_path: Path, base_directory: Path, extra_args: tuple[str, ...] = (),
                 log_path: Path | None = None, cpu: bool = True):
        self.comfyui_path = comfyui_path
        self.base_directory = make_base_directory(base_directory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = (("--cpu",) if cpu else ()) + tuple(extra_args)
        self.log_path = log_path or (self.base_directory / "server.log")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout: float = 180.0) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base_directory), "--disable-auto-launch",
             *self.extra_args],
            cwd=self.comfyui_path, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None,
        )
        self.wait_until_serving(timeout)

    def wait_until_serving(self, timeout: float = 180.0) -> None:
        """Until the server answers HTTP (after a start or a restart); raises if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}; see {self.log_path}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(0.5)  # polling for the port to open; nothing to wait on instead
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 30) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def queue(self, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        """POST /prompt: (status, body); body has prompt_id, or error and node_errors."""
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue a prompt and wait on the websocket until it finishes; returns its /history entry."""
        return asyncio.run(self._run(prompt, timeout))

    async def _run(self, prompt: dict, timeout: float) -> dict:
        import aiohttp

        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                status, body = self.queue(prompt, client_id)
                if status != 200:
                    raise PromptFailed("validation", body)
                prompt_id = body["prompt_id"]
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue
                        event = json.loads(message.data)
                        data = event.get("data", {})
                        if data.get("prompt_id") != prompt_id:
                            continue
                        if event["type"] == "execution_error":
                            raise PromptFailed("execution", data)
                        # main.py's worker stores the history, then says `executing` with node None.
                        if event["type"] == "executing" and data.get("node") is None:
                            break
        return self.get(f"/history/{prompt_id}")[prompt_id]
