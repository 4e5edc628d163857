"""FewStep nodes in the real frontend (headless Chromium, a real CPU server): found with the node
search box, dropped and wired by mouse; web/fewstep.js moving a node's steps / cfg / eta to its
family's reference (from fewstep.families, the expectation here), keeping hand changes across save
and reload, and following a FewStep loader's detected settings; and the routes it reads.
"""
from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.parse
import uuid

import pytest
from browser_harness import ARTIFACTS, DETECTED_UNET, Frontend, card_shift, reference_badge
from comfy_harness import PACK_ROOT

from comfyui_fewstep.fewstep.detection import detect_settings
from comfyui_fewstep.fewstep.families import FAMILIES

pytest_plugins = ["browser_harness"]
pytestmark = pytest.mark.browser
HAND_SET = "fewstep_hand_set"  # web/fewstep.js: node.properties key of the widgets set by hand
ETA_FROM_FAMILY = -1.0  # the eta inputs' "use the family's reference"


def hand_set(frontend: Frontend, node_id: int) -> list[str]:
    return frontend.page.evaluate(f"id => app.graph.getNodeById(id).properties['{HAND_SET}'] ?? []", node_id)


# --- mouse on the canvas -----------------------------------------------------------------------------

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


def centre_on(frontend: Frontend, node_id: int) -> None:
    frontend.page.evaluate(
        "id => { const node = app.graph.getNodeById(id); app.canvas.ds.scale = 1; app.canvas.centerOnNode(node); app.canvas.setDirty(true, true); }",
        node_id,
    )
    frontend.frames()


def point(frontend: Frontend, node_id: int, widget: str | None = None, fx: float | None = None,
          slot: dict | None = None) -> tuple[float, float]:
    where = frontend.page.evaluate(NODE_POINT_JS, {"id": node_id, "widget": widget, "fx": fx, "slot": slot})
    return where["x"], where["y"]


def choose(frontend: Frontend, node_id: int, widget: str, value: str) -> None:
    """Click a combo widget and pick `value` from the menu LiteGraph opens."""
    centre_on(frontend, node_id)
    frontend.page.mouse.click(*point(frontend, node_id, widget))
    menu = frontend.page.locator(".litecontextmenu")
    menu.get_by_text(value, exact=True).click()
    menu.wait_for(state="detached")
    frontend.frames()


def step(frontend: Frontend, node_id: int, widget: str, direction: int) -> None:
    """Click a number widget's left (−1) or right (+1) arrow."""
    centre_on(frontend, node_id)
    width = frontend.page.evaluate("id => app.graph.getNodeById(id).size[0]", node_id)
    frontend.page.mouse.click(*point(frontend, node_id, widget, fx=20 if direction < 0 else width - 20))
    frontend.frames()


def drag(frontend: Frontend, start: tuple[float, float], end: tuple[float, float]) -> None:
    mouse = frontend.page.mouse
    mouse.move(*start)
    mouse.down()
    mouse.move(*end, steps=12)
    mouse.up()
    frontend.frames()


# --- routes web/fewstep.js reads ---------------------------------------------------------------------


def test_families_route_serves_the_pure_layer(server):
    """GET /fewstep/families, which web/fewstep.js reads, is fewstep.families.FAMILIES."""
    served = server.get("/fewstep/families")["families"]
    assert list(served) == list(FAMILIES)
    for name, family in FAMILIES.items():
        assert served[name] == {
            "name": name, "display_name": family.display_name, "default_steps": family.default_steps,
            "default_cfg": family.default_cfg, "default_eta": family.default_eta,
            "only_steps": list(family.only_steps) if family.only_steps else None, "reference": family.reference,
            "guidance": family.flow.guidance if family.flow else None, "shift": served[name]["shift"],
        }
        shift = served[name]["shift"]  # the scheduler config's shift, read independently by card_shift
        if family.flow is None:
            assert shift is None
        else:
            assert card_shift(family) == ("dynamic shift" if shift == "dynamic" else f"shift {shift:g}")
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
    drag(frontend, point(frontend, checkpoint, slot={"input": False, "index": 0}),
                  point(frontend, scheduler, slot={"input": True, "index": model_input}))
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
    frontend.load_workflow(workflow)
    scheduler, sampler, sampler_custom = ids_of(frontend, "FewStepScheduler", "FewStepSampler", "SamplerCustom")
    assert frontend.widget_value(scheduler, "steps") == 3, "loading a workflow must not move its widgets"
    assert frontend.widget_value(sampler_custom, "cfg") == 2.5, "loading a workflow must not move its widgets"
    frontend.wait_for_badge(scheduler, reference_badge("turbo"))

    # The sampler's family → tcd: eta to TCD's gamma, the SamplerCustom it feeds to TCD's cfg.
    choose(frontend, sampler, "family", "tcd")
    assert frontend.widget_value(sampler, "eta") == pytest.approx(FAMILIES["tcd"].default_eta)
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(FAMILIES["tcd"].default_cfg)
    frontend.wait_for_badge(sampler, reference_badge("tcd"))

    # A hand change of steps (left arrow, 3 → 2) is remembered and kept through a family change.
    step(frontend, scheduler, "steps", -1)
    assert frontend.widget_value(scheduler, "steps") == 2
    assert hand_set(frontend, scheduler) == ["steps"]
    choose(frontend, scheduler, "family", "lightning")
    assert frontend.widget_value(scheduler, "steps") == 2
    frontend.wait_for_badge(scheduler, reference_badge("lightning"))
    # ... and a hand change of SamplerCustom's cfg (right arrow).
    step(frontend, sampler_custom, "cfg", +1)
    hand_cfg = frontend.widget_value(sampler_custom, "cfg")
    assert hand_cfg > FAMILIES["tcd"].default_cfg and hand_set(frontend, sampler_custom) == ["cfg"]
    frontend.screenshot(ARTIFACTS / "extension-before_save.png")

    # Save (what the frontend writes), reload the page, open the saved workflow: nothing moves.
    saved = page.evaluate("JSON.stringify(app.graph.serialize())")
    frontend.reload()
    frontend.load_workflow(saved)
    scheduler, sampler, sampler_custom = ids_of(frontend, "FewStepScheduler", "FewStepSampler", "SamplerCustom")
    assert [frontend.widget_value(scheduler, "family"), frontend.widget_value(scheduler, "steps")] == ["lightning", 2]
    assert frontend.widget_value(sampler, "family") == "tcd"
    assert frontend.widget_value(sampler, "eta") == pytest.approx(FAMILIES["tcd"].default_eta)
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(hand_cfg)
    assert hand_set(frontend, scheduler) == ["steps"] and hand_set(frontend, sampler_custom) == ["cfg"]
    frontend.wait_for_badge(scheduler, reference_badge("lightning"))

    # The remembered hand changes still hold after the reload.
    choose(frontend, scheduler, "family", "dmd2")
    assert frontend.widget_value(scheduler, "steps") == 2
    choose(frontend, sampler, "family", "turbo")
    assert frontend.widget_value(sampler, "eta") == ETA_FROM_FAMILY  # turbo has no eta: the family's reference
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(hand_cfg)

    # Setting steps back to the family's reference by hand lets the widget follow the family again.
    for _ in range(FAMILIES["dmd2"].default_steps - 2):
        step(frontend, scheduler, "steps", +1)
    assert frontend.widget_value(scheduler, "steps") == FAMILIES["dmd2"].default_steps
    assert hand_set(frontend, scheduler) == []
    choose(frontend, scheduler, "family", "turbo")
    assert frontend.widget_value(scheduler, "steps") == FAMILIES["turbo"].default_steps
    frontend.wait_for_badge(scheduler, reference_badge("turbo"))


def test_one_node_sampler_follows_its_family(frontend):
    page = frontend.page
    if not page.evaluate("!!LiteGraph.registered_node_types.FewStepKSampler"):
        pytest.skip("FewStepKSampler is not registered by this version of the pack")
    frontend.load_workflow(turbo_workflow())
    node = page.evaluate(
        """() => { const node = LiteGraph.createNode('FewStepKSampler'); node.pos = [900, 400]; app.graph.add(node);
                   return node.id; }"""
    )
    frontend.set_widget_values(node, {"steps": 9, "cfg": 3.0})  # as a saved workflow might hold them
    choose(frontend, node, "family", "tcd")
    tcd = FAMILIES["tcd"]
    assert [frontend.widget_value(node, name) for name in ("steps", "cfg", "eta")] == [
        tcd.default_steps, pytest.approx(tcd.default_cfg), pytest.approx(tcd.default_eta)]
    frontend.wait_for_badge(node, reference_badge("tcd"))
    step(frontend, node, "cfg", +1)
    hand_cfg = frontend.widget_value(node, "cfg")
    assert hand_cfg > tcd.default_cfg and hand_set(frontend, node) == ["cfg"]
    choose(frontend, node, "family", "hyper_sd")
    hyper = FAMILIES["hyper_sd"]
    assert frontend.widget_value(node, "steps") == hyper.default_steps
    assert frontend.widget_value(node, "cfg") == pytest.approx(hand_cfg), "the hand-set cfg is kept"
    assert frontend.widget_value(node, "eta") == ETA_FROM_FAMILY
    frontend.wait_for_badge(node, reference_badge("hyper_sd"))


def test_loader_detected_settings_reach_the_nodes_it_feeds(frontend, server):
    """Run a graph whose UNet comes from Few-Step UNet Loader (family: detect); the loader's executed
    message carries the settings it read from the file name, and the scheduler and sampler its
    settings output feeds move to them."""
    from safetensors import safe_open

    page = frontend.page
    frontend.load_workflow(turbo_workflow())
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
    frontend.shrink_latents()
    frontend.run()

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
    frontend.wait_for_badge(scheduler, text)
    frontend.wait_for_badge(sampler, text)
    frontend.screenshot(ARTIFACTS / "extension-detected.png")


def test_choosing_a_loader_file_moves_the_widgets_it_feeds(frontend, server):
    """Picking a file in Few-Step UNet Loader's combo (family: detect) moves the scheduler and sampler
    its settings feed to what the file's name says, before anything runs."""
    from safetensors import safe_open

    page = frontend.page
    frontend.load_workflow(turbo_workflow())
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
        choose(frontend, loader, "unet_name", name)
        text = reference_badge(expected.family, expected.steps, expected.cfg, expected.eta)
        frontend.wait_for_badge(scheduler, text)
        assert frontend.widget_value(scheduler, "family") == expected.family
        assert frontend.widget_value(scheduler, "steps") == expected.steps
        assert frontend.widget_value(sampler, "family") == expected.family
        frontend.wait_for_badge(sampler, text)
        frontend.wait_for_badge(loader, text)
    frontend.screenshot(ARTIFACTS / "extension-file_chosen.png")


def test_flow_family_moves_steps_cfg_and_flux_guidance(frontend):
    """Picking a flow-matching family: steps and SamplerCustom's cfg follow it, and so does the guidance of
    the Flux Guidance node on the sampler's positive prompt (FLUX.1-dev's distilled guidance), unless set
    by hand; the badge shows the σ shift the family's scheduler applies."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / "flux1_schnell_4step.json").read_text())
    workflow["id"] = str(uuid.uuid4())
    frontend.load_workflow(json.dumps(workflow))
    scheduler, sampler, sampler_custom = ids_of(frontend, "FewStepScheduler", "FewStepSampler", "SamplerCustom")
    frontend.wait_for_badge(scheduler, reference_badge("flux_schnell"))
    guidance = frontend.page.evaluate(
        """id => { const samplerCustom = app.graph.getNodeById(id);
                   const positive = samplerCustom.inputs.findIndex(i => i.name === 'positive');
                   const linkId = samplerCustom.inputs[positive].link;
                   const link = app.graph.getLink?.(linkId) ?? app.graph.links[linkId];
                   const prompt = app.graph.getNodeById(link.origin_id);
                   const guidance = LiteGraph.createNode('FluxGuidance'); guidance.pos = [560, 900];
                   app.graph.add(guidance); guidance.widgets[0].value = 2.0;
                   prompt.connect(0, guidance, 0); guidance.connect(0, samplerCustom, positive);
                   return guidance.id; }""",
        sampler_custom,
    )
    hyper = FAMILIES["hyper_flux"]
    frontend.set_widget_values(sampler_custom, {"cfg": 2.5})  # as a saved workflow might hold it
    choose(frontend, sampler, "family", "hyper_flux")
    assert frontend.widget_value(sampler_custom, "cfg") == pytest.approx(hyper.default_cfg)
    assert frontend.widget_value(guidance, "guidance") == pytest.approx(hyper.flow.guidance)
    frontend.wait_for_badge(sampler, reference_badge("hyper_flux"))
    choose(frontend, scheduler, "family", "z_image_turbo")
    assert frontend.widget_value(scheduler, "steps") == FAMILIES["z_image_turbo"].default_steps
    frontend.wait_for_badge(scheduler, reference_badge("z_image_turbo"))
    # A hand-set guidance stays through the next family change.
    step(frontend, guidance, "guidance", +1)
    hand_guidance = frontend.widget_value(guidance, "guidance")
    assert hand_guidance > hyper.flow.guidance and hand_set(frontend, guidance) == ["guidance"]
    choose(frontend, sampler, "family", "flux_turbo_alpha")
    assert frontend.widget_value(guidance, "guidance") == pytest.approx(hand_guidance)
    frontend.wait_for_badge(sampler, reference_badge("flux_turbo_alpha"))
    frontend.screenshot(ARTIFACTS / "extension-flow_family.png")
