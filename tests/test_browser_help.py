"""Node help and the Chinese locale in the real frontend (headless Chromium, a real CPU server).

- The node docs panel (select a node, press the selection toolbox's Info button) shows the pack's
  help page, web/docs/<node>.md, which the frontend fetches from /extensions/<pack>/docs/.
- With the frontend's language (the Comfy.Locale setting) set to Chinese, FewStep nodes show the
  names in locales/zh/nodeDefs.json (served by ComfyUI's /i18n) and the panel shows
  web/docs/<node>/zh.md. The README's two screenshots of this are taken here.

The expectations are read from the files themselves: the page's first heading and the translations.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from browser_harness import ARTIFACTS, DEVICE_SCALE_FACTOR, Frontend, open_page
from comfy_harness import PACK_ROOT
from readme_screenshots import ready_for_readme, save_small_png

pytest_plugins = ["browser_harness"]
pytestmark = pytest.mark.browser

DOCS = PACK_ROOT / "web" / "docs"
ZH_NODE_DEFS = json.loads((PACK_ROOT / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
WORKFLOW = PACK_ROOT / "example_workflows" / "sdxl_turbo_1step_txt2img.json"
SCREENSHOTS = PACK_ROOT / "docs" / "screenshots"
NODE = "FewStepScheduler"


@pytest.fixture(scope="module")
def page(browser, server):
    """A page drawn at twice the resolution: the README's screenshots come from it."""
    frontend = open_page(browser, server, device_scale_factor=DEVICE_SCALE_FACTOR)
    yield frontend
    frontend.page.context.close()


def has_chinese_font() -> bool:
    """Without a CJK font Chromium draws Chinese as empty boxes: the README's pictures are then not
    retaken (Debian: apt-get install fonts-noto-cjk)."""
    fc_list = shutil.which("fc-list")
    return bool(fc_list and subprocess.run([fc_list, ":lang=zh"], capture_output=True, text=True).stdout.strip())


def save_readme_picture(frontend: Frontend, name: str) -> None:
    shot = frontend.screenshot(ARTIFACTS / f"help-{name}", full_resolution=True)
    if has_chinese_font():
        save_small_png(shot, SCREENSHOTS / name)


def first_heading(markdown_path) -> str:
    return re.search(r"^# (.+)$", markdown_path.read_text(encoding="utf-8"), re.MULTILINE).group(1).strip()


def open_node_help(frontend: Frontend, node_id: int) -> None:
    """Click the node's title to select it, then the Info button of the toolbox shown over a selection."""
    frontend.frame_graph()  # the title in view, clear of the floating bars
    where = frontend.page.evaluate(
        """id => { const node = app.graph.getNodeById(id);
                   const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 30, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
                   const rect = app.canvas.canvas.getBoundingClientRect();
                   return [rect.left + x, rect.top + y]; }""",
        node_id,
    )
    frontend.page.mouse.click(*where)
    frontend.page.get_by_test_id("info-button").click()


def help_heading(frontend: Frontend, expected: str) -> str:
    """The docs panel's first heading once it reads `expected` (or what it reads after the wait)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    heading = frontend.page.locator(".node-help-content h1").first
    try:
        frontend.page.wait_for_function(
            "text => [...document.querySelectorAll('.node-help-content h1')].some(h => h.innerText.trim() === text)",
            arg=expected, timeout=20_000,
        )
    except PlaywrightTimeout:
        pass  # the caller's assertion shows what the panel holds instead
    return heading.inner_text().strip() if heading.count() else frontend.page.locator(".node-help-content").inner_text()


def set_locale(frontend: Frontend, locale: str) -> None:
    """Comfy.Locale as the settings dialog stores it (on the server, for this user), then a reload."""
    frontend.page.evaluate("locale => app.extensionManager.setting.set('Comfy.Locale', locale)", locale)
    frontend.reload()


def test_docs_panel_shows_the_fewstep_help_page(page):
    page.load_workflow(WORKFLOW.read_text())
    open_node_help(page, page.node_id(NODE))
    assert help_heading(page, first_heading(DOCS / f"{NODE}.md")) == first_heading(DOCS / f"{NODE}.md")
    # The page's family table, rendered: the lightning row with its timesteps.
    rows = page.page.locator(".node-help-content tr").all_inner_texts()
    assert any(row.startswith("lightning") and "999, 749, 499, 249" in row for row in rows), rows
    page.screenshot(ARTIFACTS / "help-en.png")


def test_chinese_locale_shows_chinese_names_and_help(page):
    expected = ZH_NODE_DEFS[NODE]
    set_locale(page, "zh")
    try:
        page.load_workflow(WORKFLOW.read_text())
        node_id = page.node_id(NODE)
        shown = page.page.evaluate(
            """id => { const node = app.graph.getNodeById(id);
                       return { title: node.title,
                                widgets: Object.fromEntries(node.widgets.map(w => [w.name, w.label ?? null])),
                                inputs: Object.fromEntries(node.inputs.map(i => [i.name, i.localized_name ?? i.label ?? null])) }; }""",
            node_id,
        )
        assert shown["title"] == expected["display_name"]
        assert shown["widgets"]["steps"] == expected["inputs"]["steps"]["name"]
        assert shown["widgets"]["family"] == expected["inputs"]["family"]["name"]
        assert shown["inputs"]["model"] == expected["inputs"]["model"]["name"]

        ready_for_readme(page)
        save_readme_picture(page, "fewstep_workflow_zh.png")

        open_node_help(page, node_id)
        zh_page = DOCS / NODE / "zh.md"
        assert help_heading(page, first_heading(zh_page)) == first_heading(zh_page)
        page.frames(3)
        save_readme_picture(page, "node_help_zh.png")
    finally:
        set_locale(page, "en")  # the setting is the server's: every later page would open in Chinese
