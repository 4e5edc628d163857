"""The real ComfyUI frontend in headless Chromium, driven the way a user drives it.

Playwright drives Debian's `chromium` (never a browser Playwright downloads) against a real
`main.py --cpu` server. The page is read through what the frontend itself exposes — `window.app`
(the graph, canvas, api) and the DOM (dialogs, toasts, the templates browser, the node search box) —
and every wait is on a condition: a page function, a DOM element, a websocket event.
"""
from __future__ import annotations

import json
import os
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

# A point on the screen for a place in a node, after centring the view on the node at scale 1.
NODE_POINT_JS = """
({ id, widget, fx, slot }) => {
  const node = app.graph.getNodeById(id);
  if (!node) throw new Error(`no node ${id}`);
  const canvas = app.canvas;
  let x, y;
  if (widget) {
    const w = node.widgets.find(w => w.name === widget);
    if (!w) throw new Error(`node ${id} has no widget ${widget}`);
    const height = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
    x = node.pos[0] + (typeof fx === 'number' && fx > 1 ? fx : node.size[0] * (fx ?? 0.5));
    y = node.pos[1] + w.y + height / 2;
  } else {
    [x, y] = node.getConnectionPos(slot.input, slot.index);
  }
  const [cx, cy] = canvas.ds.convertOffsetToCanvas([x, y]);
  const rect = canvas.canvas.getBoundingClientRect();
  return { x: rect.left + cx, y: rect.top + cy };
}
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

    def centre_on(self, node_id: int) -> None:
        self.page.evaluate(
            "id => { const node = app.graph.getNodeById(id); app.canvas.ds.scale = 1; app.canvas.centerOnNode(node); app.canvas.setDirty(true, true); }",
            node_id,
        )
        self.frames()

    def point(self, node_id: int, widget: str | None = None, fx: float | None = None,
              slot: dict | None = None) -> tuple[float, float]:
        where = self.page.evaluate(NODE_POINT_JS, {"id": node_id, "widget": widget, "fx": fx, "slot": slot})
        return where["x"], where["y"]

    def choose(self, node_id: int, widget: str, value: str) -> None:
        """Click a combo widget and pick `value` from the menu LiteGraph opens."""
        self.centre_on(node_id)
        self.page.mouse.click(*self.point(node_id, widget))
        menu = self.page.locator(".litecontextmenu")
        menu.get_by_text(value, exact=True).click()
        menu.wait_for(state="detached")
        self.frames()

    def step(self, node_id: int, widget: str, direction: int) -> None:
        """Click a number widget's left (−1) or right (+1) arrow."""
        self.centre_on(node_id)
        width = self.page.evaluate("id => app.graph.getNodeById(id).size[0]", node_id)
        self.page.mouse.click(*self.point(node_id, widget, fx=20 if direction < 0 else width - 20))
        self.frames()

    def drag(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        mouse = self.page.mouse
        mouse.move(*start)
        mouse.down()
        mouse.move(*end, steps=12)
        mouse.up()
        self.frames()

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

    def close_other_workflows(self) -> None:
        """Close every workflow tab but the active one (through the frontend's workflow store, which
        asks nothing), so a screenshot's tab bar does not depend on what was opened before."""
        self.page.evaluate(
            """async () => {
                 const store = app.extensionManager.workflow;
                 for (const workflow of [...store.openWorkflows])
                   if (workflow !== store.activeWorkflow) await store.closeWorkflow(workflow);
               }"""
        )
        self.page.wait_for_function("app.extensionManager.workflow.openWorkflows.length === 1")
        self.frames()

    def hide_job_summary(self) -> None:
        """Hide the job queue's "1 job completed" summary, which every page shows after any run on the
        server, so README screenshots show the workflow alone."""
        # Opacity, not visibility: the summary's children set their own visibility.
        self.page.evaluate(
            """() => {
                 if (!document.getElementById('fewstep-hide-job-summary')) {
                   const style = document.createElement('style');
                   style.id = 'fewstep-hide-job-summary';
                   style.textContent = '[data-fewstep-hidden] { opacity: 0 !important; }';
                   document.head.append(style);
                 }
                 for (const button of document.querySelectorAll('button[aria-label="Expand job queue"]'))
                   if (/\\bjobs? (completed|failed)\\b/.test(button.innerText))
                     button.parentElement.parentElement.setAttribute('data-fewstep-hidden', '');
               }"""
        )
        self.frames()


# Measured: retakes of the 13 workflow screenshots gave 0 visibly changed pixels (up to 8,779 raw
# ones); the first sentence of a workflow's note reworded gave 136, one digit drawn into a widget 39.
SAME_PICTURE_MAX_CHANGED_PIXELS = 16


def save_small_png(source: Path, target: Path, max_bytes: int = 250_000,
                   max_changed_pixels: int = SAME_PICTURE_MAX_CHANGED_PIXELS) -> Path:
    """Write `source` to `target` at the viewport's size as a palette PNG (UI screenshots have few
    colours), unless `target` already holds the same picture, so re-running the tests leaves the
    committed file be."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    size = (VIEWPORT["width"], VIEWPORT["height"])
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    quantised = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    if target.is_file():
        with Image.open(target) as existing:
            if existing.size == quantised.size and visibly_changed_pixels(existing, quantised) <= max_changed_pixels:
                return target
    target.parent.mkdir(parents=True, exist_ok=True)
    quantised.save(target, optimize=True)
    if target.stat().st_size > max_bytes:
        raise AssertionError(f"{target} is {target.stat().st_size} bytes, over {max_bytes}")
    return target


def visibly_changed_pixels(before, after) -> int:
    """Pixels whose grey level moved by more than 32 of 255 once both pictures are blurred by 0.7 px.

    From run to run Chromium antialiases text and edges a little differently and the palette is
    chosen anew: thousands of pixels change by a few levels, on single-pixel edges (a visually
    identical retake differed in 8,779 raw pixels, none by more than 64 levels). The slight blur
    takes single-pixel speckle under the threshold; changed text, a widget value or a moved node is
    strong contrast over several pixels and stays above it. (A 1.5 px blur also hid a reworded
    sentence in a note's small print.)"""
    from PIL import ImageChops, ImageFilter

    blur = ImageFilter.GaussianBlur(0.7)
    difference = ImageChops.difference(before.convert("L").filter(blur), after.convert("L").filter(blur))
    return difference.point(lambda value: 255 if value > 32 else 0).histogram()[255]


def save_thumbnail(screenshot: Path, target: Path, width: int = 640) -> Path:
    """The templates browser's card picture (it asks for example_workflows/<name>.jpg): the README
    screenshot at `width`, rewritten only when that screenshot is newer, so a re-run changes nothing."""
    from PIL import Image

    if target.is_file() and target.stat().st_mtime >= screenshot.stat().st_mtime:
        return target
    with Image.open(screenshot) as image:
        image = image.convert("RGB")
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        image.save(target, quality=82, optimize=True)
    return target
