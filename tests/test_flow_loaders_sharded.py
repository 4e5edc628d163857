"""FewStepUNetLoader on a diffusers transformer saved in shards, as FLUX.1-schnell's and Z-Image-Turbo's
repositories ship theirs: the tiny transformer re-saved by diffusers' own save_pretrained(max_shard_size=…)
into a copy of the repository's transformer/ folder. Picking any shard loads the whole set — by the index
json's weight_map when it lies beside the shards, else by the shards' numbered names — to the same model,
bit for bit, as the single-file save of the same weights, with the family read from the name. A missing
shard is refused, naming it, and so is an index listing weights no shard holds (shards of another download).
"""
from __future__ import annotations

import json

import pytest

from flow_shards import INDEX_NAME, shard_files, sharded_transformer
from model_fingerprint import fingerprint, release
from tiny_flow_models import build_flow_model

# (tiny base, the repository's folder, family its name gives, whether the index json is copied along)
SHARDED = [
    ("flux_schnell", "FLUX.1-schnell", "flux_schnell", True),
    ("z_image", "Z-Image-Turbo", "z_image_turbo", False),
]


def copy_repository_folder(comfy, folder, repository: str, with_index: bool) -> list[str]:
    """The shards (and the index) linked into diffusion_models/<repository>/transformer/; their names there."""
    target = comfy.models_dir / "diffusion_models" / repository / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        old.unlink()
    for source in shard_files(folder) + ([folder / INDEX_NAME] if with_index else []):
        (target / source.name).symlink_to(source)
    return [f"{repository}/transformer/{shard.name}" for shard in shard_files(folder)]


@pytest.mark.parametrize("base,repository,family,with_index", SHARDED, ids=[s[0] for s in SHARDED])
def test_any_shard_loads_the_whole_transformer(comfy, base, repository, family, with_index):
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepUNetLoader"]
    tiny = build_flow_model(base, comfy.models_dir)
    shards = copy_repository_folder(comfy, sharded_transformer(base, tiny.transformer_dir), repository, with_index)
    assert len(shards) >= 2
    single = f"{repository}-single/transformer/diffusion_pytorch_model.safetensors"
    single_path = comfy.models_dir / "diffusion_models" / single
    single_path.parent.mkdir(parents=True, exist_ok=True)
    single_path.unlink(missing_ok=True)
    single_path.symlink_to(tiny.transformer_dir / "diffusion_pytorch_model.safetensors")

    model, _ = loader.execute(unet_name=single, family="detect").args
    expected = fingerprint(model)
    release(model)
    model, settings = loader.execute(unet_name=shards[1], family="detect").args
    assert type(model.model.model_config).__name__ == tiny.comfy_class
    assert fingerprint(model) == expected, f"{shards[1]} loads to another model than the single-file save"
    assert settings.family == family
    release(model)

    if with_index:
        index = comfy.models_dir / "diffusion_models" / repository / "transformer" / INDEX_NAME
        listed = json.loads(index.read_text())
        listed["weight_map"]["transformer_blocks.7.attn.to_q.weight"] = shards[0].rsplit("/", 1)[1]
        index.unlink()
        index.write_text(json.dumps(listed))
        with pytest.raises(ValueError) as failure:
            loader.execute(unet_name=shards[0], family="detect")
        assert ("1 weights its index json lists are in none of the shards (e.g. transformer_blocks.7.attn.to_q.weight)"
                in str(failure.value))

    missing = comfy.models_dir / "diffusion_models" / shards[0]
    missing.unlink()
    with pytest.raises(ValueError) as failure:  # FewStepInputError, by name: ComfyUI imported the pack itself
        loader.execute(unet_name=shards[-1], family="detect")
    assert type(failure.value).__name__ == "FewStepInputError"
    message = str(failure.value)
    assert f"unet_name: {shards[-1]}" in message
    assert f"saved in {len(shards)} files" in message and missing.name in message
    assert "copy every shard of the set" in message
