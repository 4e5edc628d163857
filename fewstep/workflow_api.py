"""Turn a UI-format workflow (what the frontend saves) into an API-format prompt (what POST /prompt takes).

The frontend does this in the browser (`app.graphToPrompt()`); the quick start and headless runs need
it without one. Widget values are matched to input names through the server's /object_info, which
lists each node's inputs in order.
"""
from __future__ import annotations

from typing import Any

# Frontend-only nodes: they never reach the server.
UI_ONLY_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MUTED, BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(ValueError):
    """The workflow can't be turned into a prompt; the message says which node and why."""


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: list) -> bool:
    # INT inputs marked control_after_generate (seeds) carry an extra "fixed"/"randomize" value.
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(options.get("control_after_generate")) or (
        spec[0] == "INT" and name in ("seed", "noise_seed")
    )


def inputs_in_order(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the frontend lays out its widgets: required, then
    optional, each in /object_info's input_order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [(name, info["input"][category][name]) for category in ("required", "optional")
            for name in order.get(category, [])]


def ui_workflow_to_prompt(workflow: dict, object_info: dict[str, Any]) -> dict:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}  # id → [id, from, slot, to, slot, type]

    def source_of(link_id: int) -> list | None:
        """[node id, output slot] feeding this link, seen through reroutes and bypassed nodes."""
        _, origin, slot, _, _, link_type = links[link_id]
        node = nodes[origin]
        if node["type"] == "Reroute" or node.get("mode") == BYPASSED:
            # A bypassed node passes its first input of the same type straight through.
            for node_input in node.get("inputs", []):
                if node_input.get("link") is not None and (
                    node["type"] == "Reroute" or node_input.get("type") == link_type
                ):
                    return source_of(node_input["link"])
            return None
        if node.get("mode") == MUTED:
            return None
        return [str(origin), slot]

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        class_type = node["type"]
        if class_type in UI_ONLY_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(class_type)
        if info is None:
            raise WorkflowError(
                f"node #{node_id} '{class_type}' is not installed on this ComfyUI; install the pack that "
                "provides it (ComfyUI Manager: Install Missing Custom Nodes)."
            )
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            values_by_name, values = values, []
        else:
            values_by_name = {}
        inputs: dict[str, Any] = {}
        position = 0
        for name, spec in inputs_in_order(info):
            if is_widget(spec):
                if name in values_by_name:
                    inputs[name] = values_by_name[name]
                elif position < len(values):
                    inputs[name] = values[position]
                    position += 1
                    if has_control_widget(name, spec):
                        position += 1
            if name in linked:
                source = source_of(linked[name])
                if source is not None:
                    inputs[name] = source
                else:
                    inputs.pop(name, None)
        prompt[str(node_id)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": node.get("title", class_type)}}
    return prompt
