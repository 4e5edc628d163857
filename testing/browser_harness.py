"""The real ComfyUI frontend in headless Chromium, driven the way a user drives it.

Playwright drives Debian's `chromium` (never a browser Playwright downloads) against a real
`main.py --cpu` server. The page is read through what the frontend itself exposes — `window.app`
(the graph, canvas, api) and the DOM (dialogs, toasts, the templates browser, the node search box) —
and every wait is on a condition: a page function, a DOM element, a websocket event.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = PACK_ROOT / "test-artifacts" / "browser"
VIEWPORT = {"width": 1280, "height": 720}
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
]
# Pages are drawn at twice the CSS resolution; README screenshots are scaled down from that, so the
# small text of a whole workflow in 1280×720 stays legible.
DEVICE_SCALE_FACTOR = 2
# Frontend settings of the test user: the first-run templates dialog is the one the tests open
# themselves from the sidebar; for screenshots of whole workflows the minimap and the canvas info
# (fps, node counts) are hidden and nodes keep their text at any zoom (no level-of-detail switch).
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Graph.CanvasInfo": False,
}

EXTENSION_NAME = "FewStep.ReferenceDefaults"
IMAGE_OUTPUT_NODES = ("SaveImage", "PreviewImage")
RUN_TIMEOUT_MS = 240_000


def find_chromium() -> str | None:
    for candidate in (os.environ.get("FEWSTEP_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def require_browser() -> str:
    """Chromium's path, or skip: Playwright (the Python package) and a system Chromium are needed."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright not installed (pip install -r tests/requirements.txt): browser tests skipped")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found (apt-get install -y chromium, or set FEWSTEP_CHROMIUM): browser tests skipped")
    return chromium


def write_frontend_settings(base_directory: Path) -> None:
    settings = base_directory / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=2))


# Installed before any page script: records every dialog and warning/error toast the frontend shows
# (a missing-node dialog, "Invalid workflow against zod schema", "Prompt execution failed", ...), and,
# once the app's api exists, its websocket events.
RECORDER_SCRIPT = """
(() => {
  const OPENED_BY_TESTS = '.comfy-vue-node-search-box, [data-testid="template-workflows-content"], [data-testid^="template-workflow-"]';
  const record = window.__fewstepRecord = { dialogs: [], toasts: [], events: [], opened: [] };
  const seen = new WeakSet();
  const note = () => {
    for (const el of document.querySelectorAll('.p-dialog, .p-toast-message-warn, .p-toast-message-error')) {
      if (seen.has(el)) continue;
      seen.add(el);
      // Text is read a frame later: PrimeVue fills the element after inserting it. The templates
      // browser and the node search box are dialogs the tests open on purpose.
      requestAnimationFrame(() => {
        const text = (el.innerText || '').trim().slice(0, 2000);
        if (!el.classList.contains('p-dialog')) record.toasts.push(text);
        else if (el.querySelector(OPENED_BY_TESTS) || text.startsWith('Templates\\n')) record.opened.push(text);
        else record.dialogs.push(text);
      });
    }
  };
  new MutationObserver(note).observe(document, { childList: true, subtree: true });
  const hook = setInterval(() => {
    const api = window.app?.api;
    if (!api) return;
    clearInterval(hook);
    for (const type of ['execution_start', 'execution_error', 'execution_success', 'executed', 'execution_interrupted']) {
      api.addEventListener(type, ({ detail }) => record.events.push({ type, detail }));
    }
  }, 20);
})();
"""

# Visible dialogs other than `allowed` (by their text), with their text.
VISIBLE_DIALOGS_JS = """
() => [...document.querySelectorAll('.p-dialog')]
  .filter(el => el.offsetParent !== null || el.getClientRects().length)
  .map(el => (el.innerText || '').trim().slice(0, 2000))
"""

def next_frames_js(frames: int = 2) -> str:
    """A page function that resolves after `frames` animation frames: the canvas has drawn."""
    return f"""() => new Promise(resolve => {{
      let left = {frames};
      const tick = () => (--left <= 0 ? resolve(true) : requestAnimationFrame(tick));
      requestAnimationFrame(tick);
    }})"""


class Frontend:
    """One Chromium page on the ComfyUI frontend."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.page_errors: list[str] = []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.add_init_script(RECORDER_SCRIPT)

    # --- loading -------------------------------------------------------------------------------
    def open(self) -> None:
        self.page.goto(self.url)
        self.wait_ready()

    def reload(self) -> None:
        self.page_errors.clear()
        self.page.reload()
        self.wait_ready()

    def wait_ready(self, timeout: float = 120_000) -> None:
        # The app, its graph and the node definitions are there, our extension is registered, and the
        # recorder has hooked the api.
        self.page.wait_for_function(
            """name => window.app?.graph && window.app.canvas && window.LiteGraph?.registered_node_types?.FewStepScheduler
                 && (app.extensions ?? []).some(e => e.name === name) && window.__fewstepRecord
                 && app.api?.socket?.readyState === 1""",
            arg=EXTENSION_NAME, timeout=timeout,
        )
        self.frames()

    def frames(self, count: int = 2) -> None:
        self.page.evaluate(next_frames_js(count))

    def record(self) -> dict:
        return self.page.evaluate("window.__fewstepRecord")

    def clear_record(self) -> None:
        self.page.evaluate("() => { const r = window.__fewstepRecord; for (const list of Object.values(r)) list.length = 0; }")

    def problems(self) -> list[str]:
        """Dialogs and warning/error toasts shown since the record was cleared, and ones still visible
        (the templates browser, which the tests open themselves, aside)."""
        record = self.record()
        visible = self.page.evaluate(VISIBLE_DIALOGS_JS)
        found = [f"dialog: {text}" for text in record["dialogs"]]
        found += [f"toast: {text}" for text in record["toasts"]]
        found += [f"dialog still open: {text}" for text in visible
                  if f"dialog: {text}" not in found and text not in record["opened"]]
        return found

    # --- the templates browser -----------------------------------------------------------------
    def open_template(self, pack: str, name: str) -> None:
        """Sidebar → Templates → Extensions → pack → the workflow's card, as a user opens one."""
        page = self.page
        page.locator("button.templates-tab-button").click()
        page.get_by_role("button", name=pack, exact=True).click()
        page.get_by_test_id(f"template-workflow-{name}").click()
        # Loading closes the templates dialog and opens the workflow in a tab of its name.
        page.get_by_test_id(f"template-workflow-{name}").wait_for(state="detached")
        self.frames()

    # --- workflows -----------------------------------------------------------------------------
    def wait_for_graph(self, workflow: dict) -> None:
        """The canvas holds the workflow's nodes (types and count): the load has finished."""
        expected = sorted(node["type"] for node in workflow["nodes"])
        self.page.wait_for_function(
            "types => JSON.stringify(app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(types)",
            arg=expected,
        )
        self.frames()

    def load_workflow(self, workflow_json: str) -> None:
        """Open a workflow file's text as dropping the file on the canvas does (app.loadGraphData)."""
        self.clear_record()
        self.page.evaluate("text => app.loadGraphData(JSON.parse(text))", workflow_json)
        self.wait_for_graph(json.loads(workflow_json))
        assert self.problems() == [], "opening the workflow showed a dialog or warning"

    def shrink_latents(self) -> None:
        """CPU: image sizes become CPU_TEST_SIZE² (set as saved values are, not as a hand change):
        SDXL-sized latents, or an img2img input scaled to 512², would cost minutes of VAE work per
        workflow on 2 cores."""
        from workflow_models import CPU_TEST_SIZE, SIZED_NODES

        for node_type in SIZED_NODES:
            for node_id in self.node_ids(node_type):
                self.set_widget_values(node_id, {"width": CPU_TEST_SIZE, "height": CPU_TEST_SIZE})

    def run(self) -> list[dict]:
        """Press Run; wait for every image output node to show its image. Returns what they show."""
        self.frame_graph()  # the output nodes in view: the canvas loads a node's images as it draws it
        self.clear_record()
        self.page.get_by_role("button", name="Run", exact=True).first.click()
        outcome = self.page.wait_for_function(
            """outputTypes => {
                 const record = window.__fewstepRecord;
                 const failed = record.events.find(e => e.type === 'execution_error' || e.type === 'execution_interrupted');
                 if (failed) return { failed: JSON.stringify(failed.detail).slice(0, 3000) };
                 if (record.dialogs.length) return { failed: 'dialog: ' + record.dialogs.join(' | ') };
                 if (!record.events.some(e => e.type === 'execution_success')) return false;
                 const outputs = app.graph.nodes.filter(n => outputTypes.includes(n.type) && n.mode === 0);
                 if (!outputs.length) return { failed: 'the workflow has no image output node' };
                 const shown = outputs.every(n => n.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth > 0));
                 return shown && { images: outputs.map(n => ({ id: n.id, type: n.type,
                   shown: n.imgs.map(i => ({ src: i.src, width: i.naturalWidth, height: i.naturalHeight })) })) };
               }""",
            arg=list(IMAGE_OUTPUT_NODES), timeout=RUN_TIMEOUT_MS, polling=250,
        ).json_value()
        assert "failed" not in outcome, f"the run failed: {outcome['failed']}\n{self.problems()}"
        return outcome["images"]

    def wait_for_badge(self, node_id: int, text: str) -> None:
        """web/fewstep.js's reference badge on the node reads `text`."""
        self.page.wait_for_function(
            "([id, text]) => app.graph.getNodeById(id)?.fewstepReference === text", arg=[node_id, text], timeout=10_000
        )

    # --- the canvas ------------------------------------------------------------------------------
    def node_ids(self, node_type: str) -> list[int]:
        return self.page.evaluate("t => app.graph.nodes.filter(n => n.type === t).map(n => n.id)", node_type)

    def node_id(self, node_type: str) -> int:
        (node_id,) = self.node_ids(node_type)
        return node_id

    def widget_value(self, node_id: int, name: str):
        return self.page.evaluate(
            "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value", [node_id, name]
        )

    def set_widget_values(self, node_id: int, values: dict) -> None:
        """Set widgets as a saved workflow would have them (no widget callback, so not a hand change)."""
        self.page.evaluate(
            """([id, values]) => { const node = app.graph.getNodeById(id);
                 for (const [name, value] of Object.entries(values)) node.widgets.find(w => w.name === name).value = value;
                 node.setDirtyCanvas(true, true); }""",
            [node_id, values],
        )

    def frame_graph(self, region=(80, 104, 1264, 660)) -> None:
        """Fit every node (titles and badges included) into `region` of the screen (left, top, right,
        bottom in CSS pixels: clear of the sidebar, the workflow name, the run bar and the canvas
        toolbar that float over the canvas), centred, at most at scale 1."""
        self.page.evaluate(
            """([left, top, right, bottom]) => {
                 const title = LiteGraph.NODE_TITLE_HEIGHT, badge = 24;
                 let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
                 for (const n of app.graph.nodes) {
                   x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title - badge);
                   x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
                 }
                 const ds = app.canvas.ds;
                 const scale = Math.min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0), 1);
                 // screen = (graph + offset) · scale, with the bounds centred in the region.
                 const cx = (left + right) / 2, cy = (top + bottom) / 2;
                 ds.scale = scale;
                 ds.offset[0] = cx / scale - (x0 + x1) / 2;
                 ds.offset[1] = cy / scale - (y0 + y1) / 2;
                 app.canvas.setDirty(true, true);
               }""",
            list(region),
        )
        self.frames(3)

    def screenshot(self, path: Path, full_resolution: bool = False) -> Path:
        """A screenshot of the page: one pixel per CSS pixel, or per device pixel (for README images)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), scale="device" if full_resolution else "css")
        return path


def reference_badge(family: str, steps=None, cfg=None, eta=None) -> str:
    """The badge web/fewstep.js shows, spelled out independently: "lightning: 4 steps, cfg 1"."""
    from comfyui_fewstep.fewstep.families import FAMILIES

    definition = FAMILIES[family]
    steps = definition.default_steps if steps is None else steps
    cfg = definition.default_cfg if cfg is None else cfg
    eta = definition.default_eta if eta is None else eta
    text = f"{family}: {steps} step{'' if steps == 1 else 's'}"
    if definition.only_steps:
        text += " only"
    text += f", cfg {cfg:g}"
    if eta is not None and eta != -1:  # the eta inputs' "use the family's reference"
        text += f", eta {eta:g}"
    if definition.flow is not None:
        if definition.flow.guidance is not None:
            text += f", guidance {definition.flow.guidance:g}"
        text += f", {card_shift(definition)}"
    return text


def card_shift(family) -> str:
    """The σ shift of a flow family's scheduler config, in the badge's words: "shift 3", or "dynamic
    shift" where the card's pipeline computes it from the image's token count (FLUX.1-dev). Qwen-Image-
    Lightning's exponential shift with base_shift = max_shift = ln 3 is 3 at every size."""
    import math

    config = family.scheduler_overrides
    if not config.get("use_dynamic_shifting"):
        return f"shift {config['shift']:g}"
    if config.get("time_shift_type") == "exponential" and config["base_shift"] == config["max_shift"]:
        return f"shift {math.exp(config['base_shift']):.6g}"
    return "dynamic shift"


# --- fixtures: the browser test modules name this file in `pytest_plugins`, so pytest registers these
# once and every module shares the session's server and browser -------------------------------------

# A tiny SDXL UNet under a name FewStep's loader reads as SDXL-Lightning 2-step (fewstep.detection).
DETECTED_UNET = "sdxl_lightning_2step_unet.safetensors"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A `main.py --cpu` server with the test user's settings and tiny stand-ins under every file name
    the example workflows load (empty files under the flow-matching ones', whose full-size text encoders
    have none: those workflows are opened, not run), and DETECTED_UNET."""
    from comfy_harness import ComfyServer, comfyui_on_path, make_base_directory, require_comfyui
    from workflow_models import TEXT_ENCODER_LOADERS, install_stand_ins, place_file_names

    from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt

    comfyui = require_comfyui()
    require_browser()
    comfyui_on_path(comfyui)  # tiny_models builds with ComfyUI's key maps
    import tiny_models

    base = make_base_directory(tmp_path_factory.mktemp("browser_base"))
    write_frontend_settings(base)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ComfyServer(comfyui, base, log_path=ARTIFACTS / "server.log") as running:
        object_info = running.get("/object_info")
        for path in sorted((PACK_ROOT / "example_workflows").glob("*.json")):
            prompt = ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
            if any(node["class_type"] in TEXT_ENCODER_LOADERS for node in prompt.values()):
                place_file_names(prompt, base)  # listed, so they open as they would with the files there
            else:
                install_stand_ins(prompt, base)
        unet = tiny_models.build_sdxl(base / "models")
        unets = base / "models" / "diffusion_models"
        tiny_models._link((unets / unet.unet_name).resolve(), unets / DETECTED_UNET)
        yield running


@pytest.fixture(scope="session")
def browser(server):
    from playwright.sync_api import sync_playwright

    chromium = require_browser()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_page(browser, server, device_scale_factor: float = 1):
    """A new browser context with the frontend open and ready; close its `.page.context` when done."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=device_scale_factor)
    context.set_default_timeout(60_000)
    frontend = Frontend(context.new_page(), server.url)
    frontend.open()
    return frontend


@pytest.fixture(scope="module")
def module_page(browser, server):
    frontend = open_page(browser, server)
    yield frontend
    frontend.page.context.close()


@pytest.fixture
def frontend(module_page, request):
    """The module's page, reloaded when an earlier test left an error or a dialog behind."""
    if module_page.page_errors or module_page.problems():
        module_page.reload()
    module_page.clear_record()
    module_page.page.evaluate("app.extensionManager.toast.removeAll()")
    yield module_page
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    module_page.screenshot(ARTIFACTS / f"{name}-end.png")
    fewstep_errors = [error for error in module_page.page_errors if "fewstep" in error.lower()]
    assert not fewstep_errors, f"uncaught errors from web/fewstep.js: {fewstep_errors}"
