"""Every example workflow in the real frontend (headless Chromium, a real CPU server): opened from the
templates browser (Extensions → ComfyUI-FewStep) with no missing-node, validation or error dialog,
run from the Run button on tiny stand-in models placed under the published file names, its output
image shown (the flow-matching ones, whose full-size text encoders have no stand-in, are opened only);
a screenshot of it, framed in the canvas, goes to docs/screenshots/ for the README and to the templates
browser's card.

Screenshots of each step are kept in test-artifacts/browser/.
"""
from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
from browser_harness import ARTIFACTS, DEVICE_SCALE_FACTOR, open_page, reference_badge
from comfy_harness import PACK_FOLDER_NAME, PACK_ROOT, ComfyServer
from readme_screenshots import (
    SAME_PICTURE_MAX_CHANGED_PIXELS,
    ready_for_readme,
    save_small_png,
    save_thumbnail,
    visibly_changed_pixels,
)
from workflow_models import TEXT_ENCODER_LOADERS

from comfyui_fewstep.fewstep.detection import detect_settings

pytest_plugins = ["browser_harness"]
pytestmark = pytest.mark.browser


def _checkpoint_of(path: Path) -> str:
    names = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    return names[0] if names else ""


# Workflows on the same checkpoint run one after another: the server's cache keeps the last prompt's
# loaded checkpoint, so each published checkpoint is loaded once.
WORKFLOWS = sorted((PACK_ROOT / "example_workflows").glob("*.json"), key=lambda p: (_checkpoint_of(p), p.stem))
SCREENSHOTS = PACK_ROOT / "docs" / "screenshots"


@pytest.fixture(scope="module")
def camera(browser, server):
    """A second page, drawn at twice the resolution, that only opens workflows for README screenshots
    (the test page stays at one device pixel per CSS pixel: software rendering at 2× is slow)."""
    frontend = open_page(browser, server, device_scale_factor=DEVICE_SCALE_FACTOR)
    yield frontend
    frontend.page.context.close()


# Pairs of nodes whose drawn boxes (title bar included) intersect, with the sizes drawn.
OVERLAPS_JS = """
() => {
  const box = n => { const r = n.boundingRect; return [r[0], r[1], r[0] + r[2], r[1] + r[3]]; };
  const label = n => `#${n.id} ${n.type} at [${n.pos.map(Math.round)}] drawn ${n.size.map(Math.round).join('×')}`;
  const nodes = app.graph.nodes, found = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const [a, b] = [box(nodes[i]), box(nodes[j])];
    const w = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), h = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
    if (w > 2 && h > 2) found.push(`${label(nodes[i])} and ${label(nodes[j])}`);
  }
  return found;
}
"""


def output_file(server: ComfyServer, src: str) -> Path:
    query = urllib.parse.parse_qs(urllib.parse.urlparse(src).query)
    folder = {"output": "output", "temp": "temp"}[query["type"][0]]
    return server.base_directory / folder / query.get("subfolder", [""])[0] / query["filename"][0]


def linked_targets(workflow: dict, origin_id: int, output_type: str) -> list[int]:
    return [link[3] for link in workflow["links"] if link[1] == origin_id and link[5] == output_type]


# --- every example workflow, from the templates browser to its image --------------------------------


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_example_workflow_opens_from_templates_and_runs(frontend, camera, server, workflow_path):
    workflow = json.loads(workflow_path.read_text())
    stem = workflow_path.stem
    frontend.open_template(PACK_FOLDER_NAME, stem)
    frontend.wait_for_graph(workflow)
    assert frontend.problems() == [], f"opening {stem} from the templates browser showed a dialog or warning"

    # Every FewStep sampling node (those with a family) shows its family's reference before anything
    # runs (one fed by a loader's settings shows the loader's family once the loader has run, below).
    for node_id, family in frontend.page.evaluate(
        """() => app.graph.nodes
             .filter(n => n.type.startsWith('FewStep') && (n.widgets || []).some(w => w.name === 'family')
                          && !n.outputs.some(o => o.type === 'FEWSTEP_SETTINGS')
                          && !n.inputs.some(i => i.type === 'FEWSTEP_SETTINGS' && i.link != null))
             .map(n => [n.id, n.widgets.find(w => w.name === 'family')?.value])"""
    ):
        frontend.wait_for_badge(node_id, reference_badge(family))

    # The frontend draws each node at least as large as its title and widgets need: laid out at the
    # saved sizes, no node may then cover another (the README shows these screenshots).
    overlaps = frontend.page.evaluate(OVERLAPS_JS)  # asserted last, so the run is checked either way

    # The README's screenshot: the same template opened on the camera page, framed whole.
    camera.open_template(PACK_FOLDER_NAME, stem)
    camera.wait_for_graph(workflow)
    ready_for_readme(camera)
    shot = camera.screenshot(ARTIFACTS / f"{stem}-loaded.png", full_resolution=True)
    readme_shot = save_small_png(shot, SCREENSHOTS / f"{stem}.png")
    save_thumbnail(readme_shot, PACK_ROOT / "example_workflows" / f"{stem}.jpg")

    if any(node["type"] in TEXT_ENCODER_LOADERS for node in workflow["nodes"]):
        # Full-size text encoders (T5-XXL, Qwen2.5-VL, Qwen3-4B) have no tiny stand-in: opened, not run
        # (test_flow_workflows.py validates them against ComfyUI). A LoRA loader's file name is read as
        # it is opened, and the nodes its settings feed show that family's reference.
        for loader in (node for node in workflow["nodes"] if node["type"] == "FewStepLoraLoader"):
            detected = detect_settings(loader["widgets_values"][0])
            text = reference_badge(detected.family, detected.steps, detected.cfg, detected.eta)
            for node_id in (loader["id"], *linked_targets(workflow, loader["id"], "FEWSTEP_SETTINGS")):
                frontend.wait_for_badge(node_id, text)
        assert not overlaps, f"{stem}: nodes overlap as the frontend draws them: " + "; ".join(overlaps)
        return

    frontend.shrink_latents()
    images = frontend.run()
    frontend.screenshot(ARTIFACTS / f"{stem}-ran.png")
    assert frontend.problems() == [], f"running {stem} showed a dialog or warning"

    from PIL import Image

    for output in images:
        for shown in output["shown"]:
            path = output_file(server, shown["src"])
            assert path.is_file(), f"node {output['id']} shows {shown['src']}, not on the server's disk"
            with Image.open(path) as image:
                assert image.size == (shown["width"], shown["height"])

    # A FewStep loader's detected settings reached the nodes its settings output feeds.
    for event in frontend.record()["events"]:
        settings = event["type"] == "executed" and (event["detail"].get("output") or {}).get("fewstep_settings")
        if not settings or not settings[0].get("family"):
            continue
        (detected,) = settings
        loader = int(event["detail"]["node"])
        text = reference_badge(detected["family"], detected["steps"], detected["cfg"], detected["eta"])
        frontend.wait_for_badge(loader, text)
        for target in linked_targets(workflow, loader, "FEWSTEP_SETTINGS"):
            assert frontend.widget_value(target, "family") == detected["family"]
            frontend.wait_for_badge(target, text)

    assert not overlaps, f"{stem}: nodes overlap as the frontend draws them: " + "; ".join(overlaps)


def test_screenshot_comparison_ignores_antialiasing_but_sees_a_changed_digit():
    """save_small_png keeps a committed screenshot unless the retake visibly differs: the shade noise
    of a retake (every level moved a little) must count as the same picture, one digit drawn into it
    as a different one."""
    from PIL import Image, ImageDraw

    with Image.open(PACK_ROOT / "docs" / "screenshots" / "sdxl_lightning_4step_lora.png") as committed:
        screenshot = committed.convert("RGB")
    shaded = screenshot.point(lambda value: min(255, value + 6))
    assert visibly_changed_pixels(screenshot, shaded) == 0
    with_digit = screenshot.copy()
    ImageDraw.Draw(with_digit).text((700, 300), "8", fill=(220, 220, 220))
    assert visibly_changed_pixels(screenshot, with_digit) > SAME_PICTURE_MAX_CHANGED_PIXELS
