"""The pack imported as the package `comfyui_fewstep`, for the tests, the benchmarks and the tools.

ComfyUI has a top-level module `nodes` and so does this pack (a package); putting the pack's root on
sys.path would make one shadow the other, so the root is registered as a package under another name.
Importing this module does it, once. The runtime never imports anything in testing/.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_fewstep"


def register_pack() -> None:
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


register_pack()
