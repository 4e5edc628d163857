"""Test setup: the pack is imported as a package by its folder, under the name `comfyui_fewstep`.

ComfyUI has a top-level module `nodes` and so does this pack (a package); putting the pack root on
sys.path would make one shadow the other, so the root is registered as a package instead.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_fewstep"


def _register_pack() -> None:
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


_register_pack()
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests' own helpers (comfy_harness, tiny_models)
