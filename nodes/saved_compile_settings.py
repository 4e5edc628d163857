"""What of ComfyUI's own settings goes into a saved compile's key (fewstep.acceleration.saved_compiles):
its version, and the launch flags that pick the functions the model code calls."""
from __future__ import annotations

from ..fewstep.acceleration.saved_compiles import describe_value

# ComfyUI's launch flags that no model code reads (the server, its folders, the frontend, the allocator):
# left out of a saved compile's key, so that a server on another port or folder loads it. Any other
# flag, one this list does not know included, is in the key.
SETTINGS_OUTSIDE_MODEL_CODE = frozenset({
    "auto_launch", "base_directory", "cache_classic", "cache_lru", "cache_none", "cache_ram", "comfy_api_base",
    "cuda_malloc", "database_url", "default_hashing_function", "disable_all_custom_nodes", "disable_api_nodes",
    "disable_auto_launch", "disable_cuda_malloc", "disable_manager_ui", "disable_metadata", "disable_mmap",
    "dont_print_server", "enable_compress_response_body", "enable_cors_header", "enable_manager",
    "enable_manager_legacy_ui", "extra_model_paths_config", "front_end_root", "front_end_version",
    "input_directory", "listen", "log_stdout", "max_upload_size", "mmap_torch_files", "multi_user",
    "output_directory", "port", "preview_method", "preview_size", "quick_test_for_ci", "temp_directory",
    "tls_certfile", "tls_keyfile", "user_directory", "verbose", "whitelist_custom_nodes", "windows_standalone_build",
})


def comfyui_settings() -> dict:
    """ComfyUI's version, and its launch flags that choose the attention, cast and memory functions the
    model code calls."""
    import comfy.cli_args

    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = None
    flags = {name: describe_value(value) for name, value in sorted(vars(comfy.cli_args.args).items())
             if name not in SETTINGS_OUTSIDE_MODEL_CODE}
    return {"version": version, "flags": flags}
