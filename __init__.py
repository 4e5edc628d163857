"""ComfyUI-FewStep: schedulers, samplers and loaders that sample few-step models as their authors did.

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. The node classes are imported
inside it, not at module level, so the ComfyUI-free pure layer (`fewstep/`) can be imported without
ComfyUI present.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import FewStepExtension
    from .nodes.routes import register_routes

    register_routes()  # GET /fewstep/families for web/fewstep.js
    return FewStepExtension()
