"""Test setup: the shared machinery in testing/ (which registers the pack as `comfyui_fewstep`)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package


import pytest  # noqa: E402

# Compiles the tests save go to a folder of this run's own, not beside the user's Inductor cache.
os.environ.setdefault("FEWSTEP_SAVED_COMPILES_DIR", tempfile.mkdtemp(prefix="fewstep-saved-compiles-"))

from comfy_harness import COMFYUI_MISSING, COMFYUI_PATH, InProcessComfy, require_comfyui  # noqa: E402


# Layers (pytest -m): "not integration and not browser" is the fast, ComfyUI-free suite of the pure layer.
# The browser tests (test_browser_*) mark themselves `browser`.
# Modules that drive real ComfyUI (servers, installs, benchmarks) without asking for the fixtures below.
INTEGRATION_MODULES = {"test_install", "test_manager_install", "test_bench", "test_soak", "test_robustness",
                       "test_example_workflows", "test_tiny_models", "test_gpu_flow", "test_fidelity_flow"}
COMFYUI_FIXTURES = {"comfy", "comfy_server", "sd15", "sdxl", "server_sd15"}


def pytest_collection_modifyitems(config, items):
    # The browser tests last: they share one Playwright browser for the session, and Playwright's sync
    # API keeps an event loop running in the main thread until it stops, where the in-process ComfyUI
    # of the other tests needs asyncio.run.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if item.get_closest_marker("browser") is not None:  # the browser modules mark themselves
            continue
        if module in INTEGRATION_MODULES or COMFYUI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config):
    if COMFYUI_PATH is None:
        return f"!!! {COMFYUI_MISSING} !!!"
    return f"ComfyUI: {COMFYUI_PATH}"


def pytest_terminal_summary(terminalreporter):
    if COMFYUI_PATH is None:
        terminalreporter.write_line(f"!!! {COMFYUI_MISSING} !!!", red=True, bold=True)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> InProcessComfy:
    """Real ComfyUI in this process (CPU), with this pack loaded by its custom-node loader."""
    path = require_comfyui()
    return InProcessComfy(path, tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def sd15(comfy):
    """Tiny SD1.5-family model (UNet, checkpoint, diffusers copy) in comfy's models folders."""
    import tiny_models

    return tiny_models.build_sd15(comfy.models_dir)


@pytest.fixture(scope="session")
def sdxl(comfy):
    """Tiny SDXL-family model (UNet, checkpoint, diffusers copy) in comfy's models folders."""
    import tiny_models

    return tiny_models.build_sdxl(comfy.models_dir)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server (`main.py --cpu` on 127.0.0.1) shared by the session's tests."""
    from comfy_harness import ComfyServer

    path = require_comfyui()
    with ComfyServer(path, tmp_path_factory.mktemp("server_base")) as server:
        yield server


@pytest.fixture(scope="session")
def server_sd15(comfy_server):
    """The tiny SD1.5-family model in the shared server's models folders."""
    import tiny_models

    return tiny_models.build_sd15(comfy_server.base_directory / "models")
