"""FewStep's pure layer: family definitions, schedules and update rules.

Nothing here imports ComfyUI, so it can be read, tested and reused on its own; `nodes/` is the thin
glue that turns these into ComfyUI types.
"""
