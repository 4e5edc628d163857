"""Write example_workflows/*.json: one UI-format workflow per family at its model card's settings.

    python scripts/build_example_workflows.py

Each workflow is described below by its nodes, widget values and links; the JSON (the frontend's
LiteGraph format, version 0.4) is laid out from a real ComfyUI server's /object_info, so the widget
order, slot indices and types are the ones the frontend itself would save. Run it again after a
node's inputs change, and commit the JSON it writes.
"""
from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_ROOT / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, ComfyServer, find_comfyui  # noqa: E402
from comfyui_fewstep.fewstep.workflow_api import has_control_widget, inputs_in_order, is_widget  # noqa: E402

from example_workflow_specs import UI_ONLY, WORKFLOWS, N, Workflow, note  # noqa: E402 — this folder
from flow_workflow_specs import FLOW_WORKFLOWS  # noqa: E402 — this folder

OUT_DIR = PACK_ROOT / "example_workflows"

# --- Layout -----------------------------------------------------------------------------------
SLOT_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT, COLUMN_GAP, ROW_GAP = 22, 26, 30, 60, 50
MULTILINE_ROWS = 5


def node_width(node: N) -> int:
    """The frontend widens a node to fit its title: FewStep's display names list the families."""
    if node.width:
        return node.width
    if node.type.startswith("FewStep"):
        return 480
    return 400 if node.type in ("CLIPTextEncode", "SaveImage", "MarkdownNote") else 320


def _default(spec: list):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0]
    if spec[0] == "COMBO":
        return options.get("options", [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def _output_index(info: dict, output) -> int:
    if isinstance(output, int):
        return output
    names = info.get("output_name") or info["output"]
    if output in names:
        return list(names).index(output)
    return list(info["output"]).index(output)


def build(workflow: Workflow, object_info: dict) -> dict:
    ids = {node.key: index + 1 for index, node in enumerate([note(workflow.note), *workflow.nodes])}
    nodes, links = [], []
    all_nodes = [note(workflow.note), *workflow.nodes]
    outgoing: dict[tuple[int, int], list[int]] = {}
    incoming: dict[int, dict[str, tuple[int, str]]] = {}

    for node in all_nodes:
        if node.type in UI_ONLY:
            continue
        info = object_info[node.type]
        for input_name, (source_key, output) in node.links.items():
            source_info = object_info[all_nodes[ids[source_key] - 1].type]
            slot = _output_index(source_info, output)
            link_id = len(links) + 1
            link_type = source_info["output"][slot]
            links.append([link_id, ids[source_key], slot, ids[node.key], None, link_type])
            outgoing.setdefault((ids[source_key], slot), []).append(link_id)
            incoming.setdefault(ids[node.key], {})[input_name] = (link_id, link_type)

    column_y: dict[int, int] = {}
    column_width: dict[int, int] = {}
    for node in all_nodes:
        column_width[node.column] = max(column_width.get(node.column, 0), node_width(node))
    column_x, x = {}, 0
    for column in sorted(column_width):
        column_x[column] = x
        x += column_width[column] + COLUMN_GAP

    for order, node in enumerate(all_nodes):
        node_id = ids[node.key]
        inputs, values, widget_rows = [], [], 0
        if node.type in UI_ONLY:
            values = [node.widgets[name] for name in UI_ONLY[node.type]]
            outputs, height = [], 60 + 18 * node.widgets["text"].count("\n") + 18 * (len(node.widgets["text"]) // 60)
        else:
            info = object_info[node.type]
            unknown = set(node.widgets) | set(node.links)
            for name, spec in inputs_in_order(info):
                unknown.discard(name)
                if is_widget(spec):
                    value = node.widgets[name] if name in node.widgets else _default(spec)
                    values.append(value)
                    widget_rows += MULTILINE_ROWS if spec[0] == "STRING" and (spec[1] or {}).get("multiline") else 1
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if has_control_widget(name, spec):
                        values.append("fixed")
                        widget_rows += 1
                    if options.get("image_upload"):
                        values.append("image")
                        widget_rows += 1
                elif name in incoming.get(node_id, {}):
                    link_id, link_type = incoming[node_id][name]
                    inputs.append({"name": name, "type": spec[0], "link": link_id})
                    links[link_id - 1][4] = len(inputs) - 1
                else:  # an unconnected socket, listed as the frontend lists it
                    inputs.append({"name": name, "type": spec[0], "link": None})
            if unknown:
                raise SystemExit(f"{workflow.name}: {node.type} has no input(s) {sorted(unknown)}")
            names = info.get("output_name") or info["output"]
            outputs = [{"name": names[slot], "type": kind, "links": outgoing.get((node_id, slot), []),
                        "slot_index": slot} for slot, kind in enumerate(info["output"])]
            slots = max(len(inputs), len(outputs))
            height = TITLE_HEIGHT + SLOT_HEIGHT * slots + WIDGET_HEIGHT * widget_rows + 10
            if node.type == "LoadImage":
                height += 260  # the image preview
            if node.type == "SaveImage":
                height += 340
        y = column_y.get(node.column, 0)
        column_y[node.column] = y + height + ROW_GAP
        entry = {
            "id": node_id, "type": node.type, "pos": [column_x[node.column], y], "size": [node_width(node), height],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.type} if node.type not in UI_ONLY else {},
            "widgets_values": values,
        }
        if node.title or node.type in UI_ONLY:
            entry["title"] = node.title or "About this workflow"
        nodes.append(entry)

    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-fewstep/{workflow.name}")),
        "revision": 0,
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
        "version": 0.4,
    }


def main() -> int:
    comfyui = find_comfyui()
    if comfyui is None:
        print(COMFYUI_MISSING.replace("ComfyUI-bound tests skipped", "cannot build the workflows"), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as base, ComfyServer(comfyui, Path(base)) as server:
        object_info = server.get("/object_info")
    OUT_DIR.mkdir(exist_ok=True)
    for workflow in [*WORKFLOWS, *FLOW_WORKFLOWS]:
        path = OUT_DIR / f"{workflow.name}.json"
        path.write_text(json.dumps(build(workflow, object_info), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {path.relative_to(PACK_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
