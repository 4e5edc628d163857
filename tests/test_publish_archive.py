"""What the published pack holds: the runtime, its help, translations and example workflows, no
developer folders.

`comfy node publish` zips the git-tracked files minus `.comfyignore` (comfy-cli's own
`file_utils.zip_files`, run here as the publish command runs it, without the upload); `git archive`
leaves out what `.gitattributes` marks `export-ignore`. Both must keep exactly the runtime files.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import zipfile

import pytest
from comfy_harness import PACK_ROOT

DEVELOPER_FOLDERS = ("tests/", "testing/", "bench/", "scripts/", ".ci/", "docs/")
# What the pack cannot work, or be listed, without; web/docs and locales sit under folders whose
# names the developer rules also use, so they show an unanchored rule at once.
RUNTIME = ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "icon.png",
           "nodes/__init__.py", "fewstep/families.py", "web/fewstep.js", "web/docs/FewStepScheduler.md",
           "web/docs/FewStepScheduler/zh.md", "locales/zh/nodeDefs.json",
           "example_workflows/sdxl_turbo_1step_txt2img.json")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(PACK_ROOT), *args], check=True, capture_output=True, text=True).stdout


def require_git_checkout() -> None:
    if shutil.which("git") is None or not (PACK_ROOT / ".git").exists():
        pytest.skip("the pack is not a git checkout (an installed archive): nothing to publish from here")


def shipped(names: set[str]) -> set[str]:
    return {name for name in names if not name.startswith(DEVELOPER_FOLDERS)}


def test_registry_archive_leaves_out_developer_folders(tmp_path, monkeypatch):
    require_git_checkout()
    file_utils = pytest.importorskip("comfy_cli.file_utils", reason="comfy-cli not installed (pip install comfy-cli)")
    tracked = {name for name in git("ls-files", "-z").split("\0") if name and (PACK_ROOT / name).is_file()}
    monkeypatch.chdir(PACK_ROOT)  # zip_files works on the current directory, as `comfy node publish` does
    archive = tmp_path / "node.zip"
    file_utils.zip_files(str(archive), includes=[])
    with zipfile.ZipFile(archive) as zipped:
        names = {name for name in zipped.namelist() if not name.endswith("/")}

    assert not [name for name in names if name.startswith(DEVELOPER_FOLDERS)]
    assert names == shipped(tracked), (
        f"only in the archive: {sorted(names - shipped(tracked))[:10]}; "
        f"left out but needed: {sorted(shipped(tracked) - names)[:10]}")
    assert set(RUNTIME) <= names, f"missing from the Registry archive: {sorted(set(RUNTIME) - names)}"


def test_git_archive_leaves_out_the_same_folders():
    require_git_checkout()
    head = set(git("ls-tree", "-r", "--name-only", "HEAD").split("\n")) - {""}
    # The working tree's .gitattributes, so the rule under test is the checked-out one.
    tar_bytes = subprocess.run(["git", "-C", str(PACK_ROOT), "archive", "--worktree-attributes", "--format=tar", "HEAD"],
                               check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = {member.name for member in tar.getmembers() if member.isfile()}
    assert names == shipped(head), (
        f"only in the archive: {sorted(names - shipped(head))[:10]}; "
        f"left out but needed: {sorted(shipped(head) - names)[:10]}")
