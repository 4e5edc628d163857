"""The real ComfyUI frontend (comfyui-frontend-package) in headless Chromium against a real CPU server.

- Every example workflow opens from the templates browser (Extensions → ComfyUI-FewStep) with no
  missing-node, validation or error dialog, runs from the Run button on tiny stand-in models placed
  under the published file names, and shows its output image; a screenshot of it, framed in the
  canvas, goes to docs/screenshots/ for the README.
- A FewStep node is found with the node search box, dropped on the canvas and wired by mouse.
- web/fewstep.js: a family change moves steps / cfg / eta to the family's reference (from
  fewstep.families, the expectation here), hand changes are kept and survive save and reload, and a
  FewStep loader's detected settings (its `executed` message) reach the nodes its settings feed.

One server, one browser and one page for the module; screenshots of each step are kept in
test-artifacts/browser/.
"""
from __future__ import annotations

import dataclasses
import json
import re
import urllib.error
import urllib.parse
import uuid
from pathlib import Path

import pytest
from browser_harness import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    DEVICE_SCALE_FACTOR,
    SAME_PICTURE_MAX_CHANGED_PIXELS,
    VIEWPORT,
    Frontend,
    require_browser,
    save_small_png,
    save_thumbnail,
    visibly_changed_pixels,
    write_frontend_settings,
)
from comfy_harness import (
    PACK_FOLDER_NAME,
    PACK_ROOT,
    ComfyServer,
    comfyui_on_path,
    make_base_directory,
    require_comfyui,
)
from comfyui_fewstep.fewstep.detection import detect_settings
from comfyui_fewstep.fewstep.families import FAMILIES
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt
from workflow_models import CPU_TEST_SIZE, install_stand_ins


def _checkpoint_of(path: Path) -> str:
    names = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    return names[0] if names else ""


# Workflows on the same checkpoint run one after another: the server's cache keeps the last prompt's
# loaded checkpoint, so each published checkpoint is loaded once.
WORKFLOWS = sorted((PACK_ROOT / "example_workflows").glob("*.json"), key=lambda p: (_checkpoint_of(p), p.stem))
SCREENSHOTS = PACK_ROOT / "docs" / "screenshots"
IMAGE_OUTPUT_NODES = ("SaveImage", "PreviewImage")
HAND_SET = "fewstep_hand_set"  # web/fewstep.js: node.properties key of the widgets set by hand
ETA_FROM_FAMILY = -1.0  # the eta inputs' "use the family's reference"
# A tiny SDXL UNet under a name FewStep's loader reads as SDXL-Lightning 2-step (fewstep.detection).
DETECTED_UNET = "sdxl_lightning_2step_unet.safetensors"
RUN_TIMEOUT_MS = 240_000


def reference_badge(family: str, steps=None, cfg=None, eta=None) -> str:
    """The badge web/fewstep.js shows, spelled out independently: "lightning: 4 steps, cfg 1"."""
    definition = FAMILIES[family]
    steps = definition.default_steps if steps is None else steps
    cfg = definition.default_cfg if cfg is None else cfg
    eta = definition.default_eta if eta is None else eta
    text = f"{family}: {steps} step{'' if steps == 1 else 's'}"
    if definition.only_steps:
        text += " only"
    text += f", cfg {cfg:g}"
    if eta is not None and eta != ETA_FROM_FAMILY:
        text += f", eta {eta:g}"
    return text


# --- module fixtures: one server, one browser, one page --------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = require_comfyui()
    require_browser()
    comfyui_on_path(comfyui)  # tiny_models builds with ComfyUI's key maps
    base = make_base_directory(tmp_path_factory.mktemp("browser_base"))
    write_frontend_settings(base)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ComfyServer(comfyui, base, log_path=ARTIFACTS / "server.log") as running:
        object_info = running.get("/object_info")
        running.stand_ins = {}
        for path in WORKFLOWS:
            prompt = ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
            running.stand_ins[path.stem] = install_stand_ins(prompt, base)
        import tiny_models

        unet = tiny_models.build_sdxl(base / "models")
        tiny_models._link((base / "models" / "diffusion_models" / unet.unet_name).resolve(),
                          base / "models" / "diffusion_models" / DETECTED_UNET)
        yield running


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    chromium = require_browser()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def module_page(browser, server):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(60_000)
    frontend = Frontend(context.new_page(), server.url)
    frontend.open()
    yield frontend
    context.close()


@pytest.fixture(scope="module")
def camera(browser, server):
    """A second page, drawn at twice the resolution, that only opens workflows for README screenshots
    (the test page stays at one device pixel per CSS pixel: software rendering at 2× is slow)."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=DEVICE_SCALE_FACTOR)
    context.set_default_timeout(60_000)
    frontend = Frontend(context.new_page(), server.url)
    frontend.open()
    yield frontend
    context.close()


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


# --- helpers ---------------------------------------------------------------------------------------


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


def wait_for_graph(frontend: Frontend, workflow: dict) -> None:
    """The canvas holds the workflow's nodes (types and count) — the load has finished."""
    expected = sorted(node["type"] for node in workflow["nodes"])
    frontend.page.wait_for_function(
        "types => JSON.stringify(app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(types)",
        arg=expected,
    )
    frontend.frames()


def load_workflow(frontend: Frontend, workflow_json: str) -> None:
    """Open a workflow file's text as dropping the file on the canvas does (app.loadGraphData)."""
    frontend.clear_record()
    frontend.page.evaluate("text => app.loadGraphData(JSON.parse(text))", workflow_json)
    wait_for_graph(frontend, json.loads(workflow_json))
    assert frontend.problems() == [], "opening the workflow showed a dialog or warning"


# Nodes that fix the size images are sampled at, shrunk for CPU runs: SDXL-sized latents (or an
# img2img input scaled to 512²) would cost minutes of VAE work per workflow on 2 cores.
SIZE_NODES = ("EmptyLatentImage", "ImageScale")


def shrink_latents(frontend: Frontend) -> None:
    """CPU: image sizes become CPU_TEST_SIZE² (set as saved values are, not as a hand change)."""
    for node_type in SIZE_NODES:
        for node_id in frontend.node_ids(node_type):
            frontend.set_widget_values(node_id, {"width": CPU_TEST_SIZE, "height": CPU_TEST_SIZE})


def run_from_ui(frontend: Frontend) -> list[dict]:
    """Press Run; wait for every image output node to show its image. Returns what they show."""
    frontend.frame_graph()  # the output nodes in view: the canvas loads a node's images as it draws it
    frontend.clear_record()
    frontend.page.get_by_role("button", name="Run", exact=True).first.click()
    outcome = frontend.page.wait_for_function(
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
    assert "failed" not in outcome, f"the run failed: {outcome['failed']}\n{frontend.problems()}"
    return outcome["images"]


def output_file(server: ComfyServer, src: str) -> Path:
    query = urllib.parse.parse_qs(urllib.parse.urlparse(src).query)
    folder = {"output": "output", "temp": "temp"}[query["type"][0]]
    return server.base_directory / folder / query.get("subfolder", [""])[0] / query["filename"][0]


def linked_targets(workflow: dict, origin_id: int, output_type: str) -> list[int]:
    return [link[3] for link in workflow["links"] if link[1] == origin_id and link[5] == output_type]


def badge(frontend: Frontend, node_id: int) -> str:
    return frontend.page.evaluate("id => app.graph.getNodeById(id).fewstepReference ?? ''", node_id)


def hand_set(frontend: Frontend, node_id: int) -> list[str]:
    return frontend.page.evaluate(f"id => app.graph.getNodeById(id).properties['{HAND_SET}'] ?? []", node_id)


def wait_for_badge(frontend: Frontend, node_id: int, text: str) -> None:
    frontend.page.wait_for_function(
        "([id, text]) => app.graph.getNodeById(id)?.fewstepReference === text", arg=[node_id, text], timeout=10_000
    )


# --- every example workflow, from the templates browser to its image --------------------------------


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_example_workflow_opens_from_templates_and_runs(frontend, camera, server, workflow_path):
    workflow = json.loads(workflow_path.read_text())
    stem = workflow_path.stem
    frontend.open_template(PACK_FOLDER_NAME, stem)
    wait_for_graph(frontend, workflow)
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
        wait_for_badge(frontend, node_id, reference_badge(family))

    # The frontend draws each node at least as large as its title and widgets need: laid out at the
    # saved sizes, no node may then cover another (the README shows these screenshots).
    overlaps = frontend.page.evaluate(OVERLAPS_JS)  # asserted last, so the run is checked either way

    # The README's screenshot: the same template opened on the camera page, framed whole.
    camera.open_template(PACK_FOLDER_NAME, stem)
    wait_for_graph(camera, workflow)
    camera.frame_graph()
    camera.close_other_workflows()
    camera.hide_job_summary()
    shot = camera.screenshot(ARTIFACTS / f"{stem}-loaded.png", full_resolution=True)
    readme_shot = save_small_png(shot, SCREENSHOTS / f"{stem}.png")
    save_thumbnail(readme_shot, PACK_ROOT / "example_workflows" / f"{stem}.jpg")

    shrink_latents(frontend)
    images = run_from_ui(frontend)
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
        wait_for_badge(frontend, loader, text)
        for target in linked_targets(workflow, loader, "FEWSTEP_SETTINGS"):
            assert frontend.widget_value(target, "family") == detected["family"]
            wait_for_badge(frontend, target, text)

    assert not overlaps, f"{stem}: nodes overlap as the frontend draws them: " + "; ".join(overlaps)


def test_families_route_serves_the_pure_layer(server):
    """GET /fewstep/families, which web/fewstep.js reads, is fewstep.families.FAMILIES."""
    served = server.get("/fewstep/families")["families"]
    assert list(served) == list(FAMILIES)
    for name, family in FAMILIES.items():
        assert served[name] == {
            "name": name, "display_name": family.display_name, "default_steps": family.default_steps,
            "default_cfg": family.default_cfg, "default_eta": family.default_eta,
            "only_steps": list(family.only_steps) if family.only_steps else None, "reference": family.reference,
        }
    assert server.get("/api/fewstep/families")["families"] == served  # the frontend's api.fetchApi path


def test_detect_route_answers_what_the_loader_will_detect(server):
    """GET /fewstep/detect gives, for a loader and file, the settings the loader reports when it runs:
    fewstep.detection on the file's name and metadata (or the family chosen on the loader)."""
    from safetensors import safe_open

    with safe_open(str(server.base_directory / "models" / "diffusion_models" / DETECTED_UNET), "pt") as file:
        expected = detect_settings(DETECTED_UNET, file.metadata() or {})
    query = urllib.parse.urlencode({"node": "FewStepUNetLoader", "name": DETECTED_UNET})
    assert server.get(f"/api/fewstep/detect?{query}")["settings"] == dataclasses.asdict(expected)
    chosen = server.get("/api/fewstep/detect?" + urllib.parse.urlencode(
        {"node": "FewStepUNetLoader", "name": DETECTED_UNET, "family": "tcd"}))["settings"]
    assert (chosen["family"], chosen["steps"], chosen["eta"]) == ("tcd", FAMILIES["tcd"].default_steps, FAMILIES["tcd"].default_eta)
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.get(f"/api/fewstep/detect?node=KSampler&name={DETECTED_UNET}")
    assert refused.value.code == 400 and "KSampler" in json.loads(refused.value.read())["error"]


# --- the node search box ----------------------------------------------------------------------------


def search_and_drop(frontend: Frontend, at: tuple[float, float], query: str, display_name: str) -> int:
    """Double-click the empty canvas at `at`, search, pick the result; returns the new node's id."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = frontend.page
    before = set(page.evaluate("app.graph.nodes.map(n => n.id)"))
    box = page.get_by_placeholder("Search Nodes...")
    for attempt in range(3):
        # A double-click LiteGraph misses (its second press came too late for a busy page) opens
        # nothing, or a box that the second click closes again: then the user double-clicks again.
        box.wait_for(state="detached")
        page.mouse.dblclick(*at)
        try:
            box.fill(query, timeout=10_000)
            page.get_by_role("option", name=display_name, exact=True).click(timeout=10_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    page.wait_for_function("count => app.graph.nodes.length === count", arg=len(before) + 1)
    (new_id,) = set(page.evaluate("app.graph.nodes.map(n => n.id)")) - before
    frontend.frames()
    return new_id


def test_node_search_drops_a_fewstep_node_and_it_connects(frontend):
    page = frontend.page
    page.get_by_role("button", name="Create a new blank workflow").click()
    page.wait_for_function("app.graph.nodes.length === 0")
    frontend.frames()
    scheduler_name = page.evaluate("LiteGraph.registered_node_types.FewStepScheduler.title")

    checkpoint = search_and_drop(frontend, (330, 300), "load checkpoint", "Load Checkpoint")
    scheduler = search_and_drop(frontend, (760, 300), "few-step scheduler", scheduler_name)
    assert page.evaluate("id => app.graph.getNodeById(id).type", scheduler) == "FewStepScheduler"
    # Dropped where the search was opened: the node's corner is at the double-clicked graph point.
    dropped = page.evaluate(
        "id => { const n = app.graph.getNodeById(id); return app.canvas.ds.convertOffsetToCanvas(n.pos); }", scheduler
    )
    assert abs(dropped[0] - 760) < 40 and abs(dropped[1] - 300) < 80, dropped
    frontend.screenshot(ARTIFACTS / "node_search-dropped.png")

    # Drag from Load Checkpoint's MODEL output to the scheduler's model input.
    model_input = page.evaluate(
        "id => app.graph.getNodeById(id).inputs.findIndex(i => i.name === 'model')", scheduler
    )
    frontend.drag(frontend.point(checkpoint, slot={"input": False, "index": 0}),
                  frontend.point(scheduler, slot={"input": True, "index": model_input}))
    link = page.evaluate(
        """id => { const input = app.graph.getNodeById(id).inputs.find(i => i.name === 'model');
                   const link = input.link == null ? null : (app.graph.getLink?.(input.link) ?? app.graph.links[input.link]);
                   return link && { id: link.id, origin_id: link.origin_id, origin_slot: link.origin_slot,
                                    target_id: link.target_id, target_slot: link.target_slot, type: link.type }; }""",
        scheduler,
    )
    frontend.screenshot(ARTIFACTS / "node_search-connected.png")
    assert link == {"id": link and link["id"], "origin_id": checkpoint, "origin_slot": 0,
                    "target_id": scheduler, "target_slot": model_input, "type": "MODEL"}
    assert link["id"] in page.evaluate("id => app.graph.getNodeById(id).outputs[0].links", checkpoint)


# --- web/fewstep.js ---------------------------------------------------------------------------------


def turbo_workflow(**changes) -> str:
    """The SDXL-Turbo example with some saved widget values changed, under a fresh workflow id."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / "sdxl_turbo_1step_txt2img.json").read_text())
    workflow["id"] = str(uuid.uuid4())
    for node in workflow["nodes"]:
        for index, value in changes.get(node["type"], {}).items():
            node["widgets_values"][index] = value
    return json.dumps(workflow)


def ids_of(frontend: Frontend, *types: str) -> list[int]:
    return [frontend.node_id(t) for t in types]


def test_family_change_moves_widgets_to_reference_keeps_hand_changes_and_survives_reload(frontend):
    page = frontend.page
    # As saved: scheduler at 3 steps, SamplerCustom at cfg 2.5 (widgets_values: family, steps, ...;
    # add_noise, noise_seed, control, cfg).
    workflow = turbo_workflow(FewStepScheduler={1: 3}, SamplerCustom={3: 2.5})
    load_workflow(frontend, workflow)
    scheduler, sampler, sampler_custom = ids_of(frontend, "FewStepScheduler", "FewStepSampler", "SamplerCustom")
    assert frontend.widget_value(scheduler, "steps") == 3, "loading a workflow must not move its widgets"
    assert frontend.widget_value(sampler_custom, "cfg") == 2.5, "loading a workflow must not move its widgets"
    wait_for_badge(frontend, scheduler, reference_badge("turbo"))

    # The sampler's family → tcd: eta to TCD's gamma, the SamplerCustom it feeds to TCD's cfg.
    frontend.choose(sampler, "family", "tcd")
    assert frontend.widget_value(sampler, "eta") == pytest.approx(FAMILIES["tcd"].default_eta)
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(FAMILIES["tcd"].default_cfg)
    wait_for_badge(frontend, sampler, reference_badge("tcd"))

    # A hand change of steps (left arrow, 3 → 2) is remembered and kept through a family change.
    frontend.step(scheduler, "steps", -1)
    assert frontend.widget_value(scheduler, "steps") == 2
    assert hand_set(frontend, scheduler) == ["steps"]
    frontend.choose(scheduler, "family", "lightning")
    assert frontend.widget_value(scheduler, "steps") == 2
    wait_for_badge(frontend, scheduler, reference_badge("lightning"))
    # ... and a hand change of SamplerCustom's cfg (right arrow).
    frontend.step(sampler_custom, "cfg", +1)
    hand_cfg = frontend.widget_value(sampler_custom, "cfg")
    assert hand_cfg > FAMILIES["tcd"].default_cfg and hand_set(frontend, sampler_custom) == ["cfg"]
    frontend.screenshot(ARTIFACTS / "extension-before_save.png")

    # Save (what the frontend writes), reload the page, open the saved workflow: nothing moves.
    saved = page.evaluate("JSON.stringify(app.graph.serialize())")
    frontend.reload()
    load_workflow(frontend, saved)
    scheduler, sampler, sampler_custom = ids_of(frontend, "FewStepScheduler", "FewStepSampler", "SamplerCustom")
    assert [frontend.widget_value(scheduler, "family"), frontend.widget_value(scheduler, "steps")] == ["lightning", 2]
    assert frontend.widget_value(sampler, "family") == "tcd"
    assert frontend.widget_value(sampler, "eta") == pytest.approx(FAMILIES["tcd"].default_eta)
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(hand_cfg)
    assert hand_set(frontend, scheduler) == ["steps"] and hand_set(frontend, sampler_custom) == ["cfg"]
    wait_for_badge(frontend, scheduler, reference_badge("lightning"))

    # The remembered hand changes still hold after the reload.
    frontend.choose(scheduler, "family", "dmd2")
    assert frontend.widget_value(scheduler, "steps") == 2
    frontend.choose(sampler, "family", "turbo")
    assert frontend.widget_value(sampler, "eta") == ETA_FROM_FAMILY  # turbo has no eta: the family's reference
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(hand_cfg)

    # Setting steps back to the family's reference by hand lets the widget follow the family again.
    for _ in range(FAMILIES["dmd2"].default_steps - 2):
        frontend.step(scheduler, "steps", +1)
    assert frontend.widget_value(scheduler, "steps") == FAMILIES["dmd2"].default_steps
    assert hand_set(frontend, scheduler) == []
    frontend.choose(scheduler, "family", "turbo")
    assert frontend.widget_value(scheduler, "steps") == FAMILIES["turbo"].default_steps
    wait_for_badge(frontend, scheduler, reference_badge("turbo"))


def test_one_node_sampler_follows_its_family(frontend):
    page = frontend.page
    if not page.evaluate("!!LiteGraph.registered_node_types.FewStepKSampler"):
        pytest.skip("FewStepKSampler is not registered by this version of the pack")
    load_workflow(frontend, turbo_workflow())
    node = page.evaluate(
        """() => { const node = LiteGraph.createNode('FewStepKSampler'); node.pos = [900, 400]; app.graph.add(node);
                   return node.id; }"""
    )
    frontend.set_widget_values(node, {"steps": 9, "cfg": 3.0})  # as a saved workflow might hold them
    frontend.choose(node, "family", "tcd")
    tcd = FAMILIES["tcd"]
    assert [frontend.widget_value(node, name) for name in ("steps", "cfg", "eta")] == [
        tcd.default_steps, pytest.approx(tcd.default_cfg), pytest.approx(tcd.default_eta)]
    wait_for_badge(frontend, node, reference_badge("tcd"))
    frontend.step(node, "cfg", +1)
    hand_cfg = frontend.widget_value(node, "cfg")
    assert hand_cfg > tcd.default_cfg and hand_set(frontend, node) == ["cfg"]
    frontend.choose(node, "family", "hyper_sd")
    hyper = FAMILIES["hyper_sd"]
    assert frontend.widget_value(node, "steps") == hyper.default_steps
    assert frontend.widget_value(node, "cfg") == pytest.approx(hand_cfg), "the hand-set cfg is kept"
    assert frontend.widget_value(node, "eta") == ETA_FROM_FAMILY
    wait_for_badge(frontend, node, reference_badge("hyper_sd"))


def test_loader_detected_settings_reach_the_nodes_it_feeds(frontend, server):
    """Run a graph whose UNet comes from Few-Step UNet Loader (family: detect); the loader's executed
    message carries the settings it read from the file name, and the scheduler and sampler its
    settings output feeds move to them."""
    from safetensors import safe_open

    page = frontend.page
    load_workflow(frontend, turbo_workflow())
    scheduler, sampler, sampler_custom = ids_of(frontend, "FewStepScheduler", "FewStepSampler", "SamplerCustom")
    loader = page.evaluate(
        """([unet, ids]) => {
             const [scheduler, sampler, samplerCustom] = ids.map(id => app.graph.getNodeById(id));
             const loader = LiteGraph.createNode('FewStepUNetLoader');
             loader.pos = [40, 420];
             app.graph.add(loader);
             loader.widgets.find(w => w.name === 'unet_name').value = unet;
             const slot = (node, name) => node.inputs.findIndex(i => i.name === name);
             loader.connect(0, samplerCustom, slot(samplerCustom, 'model'));
             loader.connect(0, scheduler, slot(scheduler, 'model'));
             loader.connect(1, scheduler, slot(scheduler, 'settings'));
             loader.connect(1, sampler, slot(sampler, 'settings'));
             return loader.id;
           }""",
        [DETECTED_UNET, [scheduler, sampler, sampler_custom]],
    )
    assert frontend.widget_value(loader, "family") == "detect"
    shrink_latents(frontend)
    run_from_ui(frontend)

    with safe_open(str(server.base_directory / "models" / "diffusion_models" / DETECTED_UNET), "pt") as file:
        expected = detect_settings(DETECTED_UNET, file.metadata() or {})
    assert expected.family == "lightning" and expected.steps == 2  # what the name says (SDXL-Lightning card)
    executed = [e["detail"]["output"]["fewstep_settings"][0] for e in frontend.record()["events"]
                if e["type"] == "executed" and str(e["detail"]["node"]) == str(loader)]
    assert executed and executed[0]["family"] == expected.family and executed[0]["steps"] == expected.steps
    assert frontend.widget_value(scheduler, "family") == expected.family
    assert frontend.widget_value(scheduler, "steps") == expected.steps  # was turbo's 1
    assert frontend.widget_value(sampler, "family") == expected.family
    text = reference_badge(expected.family, expected.steps, expected.cfg, expected.eta)
    wait_for_badge(frontend, scheduler, text)
    wait_for_badge(frontend, sampler, text)
    frontend.screenshot(ARTIFACTS / "extension-detected.png")


def test_choosing_a_loader_file_moves_the_widgets_it_feeds(frontend, server):
    """Picking a file in Few-Step UNet Loader's combo (family: detect) moves the scheduler and sampler
    its settings feed to what the file's name says, before anything runs."""
    from safetensors import safe_open

    page = frontend.page
    load_workflow(frontend, turbo_workflow())
    scheduler, sampler = ids_of(frontend, "FewStepScheduler", "FewStepSampler")
    loader = page.evaluate(
        """ids => {
             const [scheduler, sampler] = ids.map(id => app.graph.getNodeById(id));
             const loader = LiteGraph.createNode('FewStepUNetLoader');
             loader.pos = [40, 420];
             app.graph.add(loader);
             const slot = (node, name) => node.inputs.findIndex(i => i.name === name);
             loader.connect(1, scheduler, slot(scheduler, 'settings'));
             loader.connect(1, sampler, slot(sampler, 'settings'));
             return loader.id;
           }""",
        [scheduler, sampler],
    )
    for name in (DETECTED_UNET, "Hyper-SDXL-1step-Unet.safetensors"):
        path = server.base_directory / "models" / "diffusion_models" / name
        with safe_open(str(path), "pt") as file:
            expected = detect_settings(name, file.metadata() or {})
        assert expected.family is not None, f"{name} should read as a few-step UNet"
        frontend.choose(loader, "unet_name", name)
        text = reference_badge(expected.family, expected.steps, expected.cfg, expected.eta)
        wait_for_badge(frontend, scheduler, text)
        assert frontend.widget_value(scheduler, "family") == expected.family
        assert frontend.widget_value(scheduler, "steps") == expected.steps
        assert frontend.widget_value(sampler, "family") == expected.family
        wait_for_badge(frontend, sampler, text)
        wait_for_badge(frontend, loader, text)
    frontend.screenshot(ARTIFACTS / "extension-file_chosen.png")


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
