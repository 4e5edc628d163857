"""GET /fewstep/families: each family's reference settings, for the frontend (web/fewstep.js).

The browser reads the defaults from here rather than keeping a copy of fewstep.families in JS, so a
new family reaches the widgets and badges without a frontend change.
"""
from __future__ import annotations

import logging
import sys

from ..fewstep.families import FAMILIES, Family

ROUTE = "/fewstep/families"
log = logging.getLogger(__name__)
_registered = False


def family_defaults(family: Family) -> dict:
    """What the frontend moves a node's widgets to, and the line its badge shows."""
    return {
        "name": family.name,
        "display_name": family.display_name,
        "default_steps": family.default_steps,
        "default_cfg": family.default_cfg,
        "default_eta": family.default_eta,
        "only_steps": list(family.only_steps) if family.only_steps else None,
        "reference": family.reference,
    }


def families_payload() -> dict:
    return {"families": {name: family_defaults(family) for name, family in FAMILIES.items()}}


def register_routes() -> bool:
    """Add the route to ComfyUI's PromptServer, once; False where there is no server (in-process tests)."""
    global _registered
    if _registered:
        return True
    # main.py imports ComfyUI's `server` and makes its PromptServer before loading custom nodes; where
    # it has not (ComfyUI's executor imported in process), there is no server to add a route to.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def get_families(request):
        return web.json_response(families_payload())

    _registered = True
    log.debug("FewStep: serving %s", ROUTE)
    return True
