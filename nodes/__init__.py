"""FewStep's ComfyUI nodes (V3 schema), registered through one ComfyExtension."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .acceleration import ACCELERATION_NODES
from .loaders import LOADER_NODES
from .preview import PREVIEW_NODES
from .sampling import SAMPLING_NODES


class FewStepExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*SAMPLING_NODES, *LOADER_NODES, *ACCELERATION_NODES, *PREVIEW_NODES]
