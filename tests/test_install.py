"""scripts/setup.sh and scripts/quickstart.sh as a user meets them: a user's torch is never touched,
and a missing ComfyUI is cloned at the tested release or named in one message saying what to run."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from comfy_harness import PACK_ROOT, require_comfyui

STAND_IN_TORCH = "2.13.0"  # not the version setup.sh installs where there is none
STAND_IN_TORCHVISION = "0.28.0"


def write_stand_in(site_packages: Path, name: str, version: str) -> None:
    """An importable package with the dist-info pip reads: what `pip show NAME` sees."""
    (site_packages / name).mkdir()
    (site_packages / name / "__init__.py").write_text(f'__version__ = "{version}"\n')
    info = site_packages / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n")


def pip_show_version(python: Path, name: str) -> str:
    shown = subprocess.run([str(python), "-m", "pip", "show", name], capture_output=True, text=True, check=True)
    return next(line.split(":", 1)[1].strip() for line in shown.stdout.splitlines() if line.startswith("Version:"))


@pytest.fixture
def venv_with_other_torch(tmp_path) -> Path:
    """A virtual environment whose torch (and torchvision) are small stand-ins of other versions.

    It sees this Python's packages (--system-site-packages), so everything else setup.sh asks for is
    already there and nothing is downloaded; its own site-packages come first, so `import torch`
    finds the stand-in.
    """
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(environment)
    python = environment / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    write_stand_in(site_packages, "torch", STAND_IN_TORCH)
    write_stand_in(site_packages, "torchvision", STAND_IN_TORCHVISION)
    assert pip_show_version(python, "torch") == STAND_IN_TORCH
    return python


def test_quickstart_leaves_an_installed_torch_as_it_is(venv_with_other_torch):
    comfyui = require_comfyui()
    python = venv_with_other_torch
    # No index: were setup.sh to want another torch, pip could not fetch one and the run would say so.
    environment = {**os.environ, "PYTHON": str(python), "COMFYUI_PATH": str(comfyui), "PIP_NO_INDEX": "1"}
    environment.pop("PIP_FIND_LINKS", None)
    run = subprocess.run(["bash", str(PACK_ROOT / "scripts" / "quickstart.sh"), "--cpu"],
                         capture_output=True, text=True, env=environment, timeout=900)
    output = run.stdout + run.stderr
    assert f"torch {STAND_IN_TORCH} is installed: left as it is" in output, output[-4000:]
    assert ">>> set up: ComfyUI at" in output, output[-4000:]  # every install step ran and passed
    assert pip_show_version(python, "torch") == STAND_IN_TORCH
    assert pip_show_version(python, "torchvision") == STAND_IN_TORCHVISION
    # The workflow itself then fails on the stand-in torch: that it got that far is the point.


def test_setup_without_comfyui_says_what_to_run(tmp_path):
    missing = tmp_path / "ComfyUI"
    environment = {**os.environ, "COMFYUI_PATH": str(missing), "PYTHON": sys.executable,
                   "COMFYUI_REPOSITORY": str(tmp_path / "no-such-repository"), "GIT_TERMINAL_PROMPT": "0"}
    run = subprocess.run(["bash", str(PACK_ROOT / "scripts" / "setup.sh")],
                         capture_output=True, text=True, env=environment, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"cloning {tmp_path / 'no-such-repository'} at v0.8.0 into {missing}" in run.stdout
    assert f"git clone --branch v0.8.0 {tmp_path / 'no-such-repository'} \"{missing}\"" in run.stderr
    assert not missing.exists()  # nothing half-cloned left behind


def test_setup_clones_comfyui_at_the_tested_release(tmp_path):
    """A stand-in ComfyUI repository with the release tag: setup.sh clones that tag, then installs
    from its requirements (none here) and goes on."""
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "main.py").write_text("# stand-in\n")
    (origin / "requirements.txt").write_text("")
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "release"], check=True)
    subprocess.run([*git, "tag", "v0.8.0"], check=True)
    (origin / "main.py").write_text("# after the release\n")
    subprocess.run([*git, "commit", "-qam", "later"], check=True)
    target = tmp_path / "ComfyUI"
    environment = {**os.environ, "COMFYUI_PATH": str(target), "PYTHON": sys.executable,
                   "COMFYUI_REPOSITORY": f"file://{origin}", "PIP_NO_INDEX": "1"}
    run = subprocess.run(["bash", str(PACK_ROOT / "scripts" / "setup.sh")],
                         capture_output=True, text=True, env=environment, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (target / "main.py").read_text() == "# stand-in\n"  # the tagged release, not the newest commit
