"""Installing the pack the way users do: the Comfy Registry's checks and ComfyUI-Manager from a git URL.

The Manager tests start real ComfyUI with `--enable-manager` in a throwaway base directory whose
custom_nodes/ is empty, ask the Manager's HTTP API to install the pack from a bare clone of this
repository (a file:// URL stands in for the remote), let it run `pip install` on requirements.txt,
restart ComfyUI through the Manager, and look for the nodes in GET /object_info. The Manager runs
with `network_mode = offline`, so it reads its node database from its local cache; pip finds
requirements.txt already satisfied by the test environment.
"""
from __future__ import annotations

import asyncio
import configparser
import importlib.util
import json
import platform
import re
import subprocess
import sys
import tomllib
import urllib.error
import uuid
from pathlib import Path

import pytest

from comfy_harness import PACK_FOLDER_NAME, PACK_ROOT, ComfyServer, comfyui_on_path, require_comfyui

PYPROJECT = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())

MANAGER_MISSING = (
    "comfyui_manager not installed (pip install -r ComfyUI/manager_requirements.txt): "
    "Manager install tests skipped"
)
COMFY_CLI_MISSING = "comfy-cli not installed (pip install comfy-cli): its `comfy node validate` skipped"




# --- The Comfy Registry -------------------------------------------------------------------------


def test_comfy_cli_node_validate_passes_without_warnings():
    """comfy-cli's `comfy node validate`: what `comfy node publish` checks before uploading."""
    if importlib.util.find_spec("comfy_cli") is None:
        pytest.skip(COMFY_CLI_MISSING)
    result = subprocess.run(
        [sys.executable, "-m", "comfy_cli", "--skip-prompt", "node", "validate"],
        cwd=PACK_ROOT, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    # comfy-cli only warns (exit 0) on a malformed license, classifier or version range.
    assert "Warning" not in output and "Security warnings" not in output, output


def test_pyproject_follows_the_registry_specification():
    """The rules of docs.comfy.org/registry/specifications that comfy-cli leaves to the Registry."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]

    # name: the node id. < 100 characters; letters, digits, - _ .; no two special characters in a
    # row; starts with a letter.
    name = project["name"]
    assert name == "comfyui-fewstep"
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "version must be semantic X.Y.Z"
    assert project["description"].strip()
    # license: a table naming a file that exists, or a text; a bare string is the documented mistake.
    license_ = project["license"]
    assert isinstance(license_, dict) and ("file" in license_ or "text" in license_), license_
    if "file" in license_:
        assert (PACK_ROOT / license_["file"]).is_file()
        assert "MIT License" in (PACK_ROOT / license_["file"]).read_text()
    assert SpecifierSet(project["requires-python"]).contains(platform.python_version())
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", project["urls"]["Repository"])

    # dependencies: exactly requirements.txt (which the Manager installs), never torch.
    requirements = [
        str(Requirement(line.split("#")[0]))
        for line in (PACK_ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert [str(Requirement(d)) for d in project["dependencies"]] == requirements
    assert not {Requirement(d).name.lower() for d in project["dependencies"]} & {"torch", "torchvision", "torchaudio"}

    assert comfy["PublisherId"].strip()
    assert comfy["DisplayName"] == "ComfyUI-FewStep"
    assert re.fullmatch(r"https://\S+\.(svg|png|jpe?g|gif)", comfy["Icon"]), "Icon: URL of an SVG, PNG, JPG or GIF"
    # The URL names a file of this repository's main branch: that file must be shipped, and be an image.
    icon = PACK_ROOT / comfy["Icon"].split("/main/", 1)[1]
    from PIL import Image

    with Image.open(icon) as image:
        assert image.format == "PNG" and image.width == image.height >= 128
    assert isinstance(comfy.get("includes", []), list)
    assert all((PACK_ROOT / path).exists() for path in comfy.get("includes", []))


def test_comfyui_reads_the_pyproject_as_a_node_pack():
    """ComfyUI parses this file with its own Registry types (comfy_config) when it loads the pack."""
    comfyui_on_path()
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(PACK_ROOT))
    assert config.project.name == PYPROJECT["project"]["name"]
    assert config.project.version == PYPROJECT["project"]["version"]
    assert config.project.urls.repository == PYPROJECT["project"]["urls"]["Repository"]
    assert config.project.license.file == "LICENSE"
    assert config.tool_comfy.publisher_id == PYPROJECT["tool"]["comfy"]["PublisherId"]
    assert config.tool_comfy.display_name == "ComfyUI-FewStep"
    assert config.project.supported_os == ["OS Independent"]
    # WEB_DIRECTORY in __init__.py serves web/; a `web` key here would register it a second time.
    assert config.tool_comfy.web is None


# --- ComfyUI-Manager ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack_remote(tmp_path_factory) -> tuple[str, str]:
    """A bare clone of this repository as the pack's git remote: (URL, commit it serves)."""
    if importlib.util.find_spec("comfyui_manager") is None:
        pytest.skip(MANAGER_MISSING)
    require_comfyui()
    if subprocess.run(["git", "-C", str(PACK_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip(f"{PACK_ROOT} is not a git checkout: nothing to serve as the pack's git remote")
    remote = tmp_path_factory.mktemp("remote") / PACK_FOLDER_NAME  # the folder name Manager clones into
    subprocess.run(["git", "clone", "--quiet", "--bare", str(PACK_ROOT), str(remote)], check=True)
    head = subprocess.run(["git", "-C", str(remote), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    # file://localhost/…: git clones it like file:///…, and the Manager only takes URLs with a host.
    return f"file://localhost{remote}", head


def manager_server(base: Path, config: dict[str, str], *flags: str) -> ComfyServer:
    """ComfyUI with the Manager on, an empty custom_nodes/ and the Manager's config.ini."""
    server = ComfyServer(require_comfyui(), base, extra_args=("--enable-manager", *flags))
    (base / "custom_nodes" / PACK_FOLDER_NAME).unlink()  # the harness links the pack; here Manager installs it
    parser = configparser.ConfigParser()
    parser["default"] = {
        "network_mode": "offline",  # read the node database from the cache; fetch nothing
        "use_uv": "False",  # plain pip, as a user without uv has
        "file_logging": "False",
        **config,
    }
    manager_dir = base / "user" / "__manager"  # folder_paths.get_system_user_directory("manager")
    manager_dir.mkdir(parents=True, exist_ok=True)
    with open(manager_dir / "config.ini", "w") as file:
        parser.write(file)
    return server


def seed_manager_database(base: Path, git_url: str) -> None:
    """The pack's entry in the Manager's node database, where the Manager looks for it offline.

    Offline, the Manager reads its default channel's custom-node-list.json from its cache file, named
    by comfyui_manager's own hash of the channel URL; the entry is what the public list holds for a
    git-installed pack: its git URL in `files`.
    """
    comfyui_on_path()  # comfyui_manager imports comfy.cli_args
    from comfyui_manager.common import manager_util

    template = Path(manager_util.comfyui_manager_path, "channels.list.template").read_text()
    channel = next(line.split("::", 1)[1] for line in template.splitlines() if line.startswith("default::"))
    cache = base / "user" / "__manager" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    entry = {
        "id": PYPROJECT["project"]["name"],  # entries whose URL is not on github.com are indexed by id
        "author": PYPROJECT["tool"]["comfy"]["PublisherId"],
        "title": PYPROJECT["tool"]["comfy"]["DisplayName"],
        "reference": git_url,
        "files": [git_url],
        "install_type": "git-clone",
        "description": PYPROJECT["project"]["description"],
    }
    name = f"{manager_util.simple_hash(channel + '/custom-node-list.json')}_custom-node-list.json"
    (cache / name).write_text(json.dumps({"custom_nodes": [entry]}))


async def _run_manager_task(server: ComfyServer, task: dict, timeout: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={task['client_id']}") as ws:
            async with session.post(f"{server.url}/v2/manager/queue/task", json=task) as response:
                assert response.status == 200, await response.text()
            async with session.get(f"{server.url}/v2/manager/queue/start") as response:
                assert response.status in (200, 201), await response.text()
            async with asyncio.timeout(timeout):
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    if event["type"] == "cm-task-completed" and event["data"]["ui_id"] == task["ui_id"]:
                        return event["data"]
    raise AssertionError("the Manager's websocket closed before the task completed")


def restart_through_manager(server: ComfyServer) -> None:
    """GET /v2/manager/reboot: the Manager re-executes ComfyUI in place, so no answer comes back."""
    try:
        server.get("/v2/manager/reboot", timeout=60)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"the Manager refused to restart: HTTP {error.code}") from error
    except OSError:
        pass  # the connection dropped when the process image was replaced
    else:
        raise AssertionError("the Manager answered the reboot request instead of restarting")
    server.wait_until_serving()


def pack_node_ids(pack: Path) -> set[str]:
    """The node ids the pack's source declares, read from the installed copy itself."""
    return {
        match
        for source in (pack / "nodes").glob("*.py")
        for match in re.findall(r'node_id="(FewStep\w+)"', source.read_text())
    }


def check_installed_and_loaded(server: ComfyServer, base: Path, commit: str) -> None:
    installed = base / "custom_nodes" / PACK_FOLDER_NAME
    assert (installed / "__init__.py").is_file(), f"nothing cloned into {installed}"
    head = subprocess.run(["git", "-C", str(installed), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.stdout.strip() == commit
    # The Manager ran pip on every requirement of the clone (its log wraps long lines).
    log = " ".join(server.log_text().split())
    for line in (installed / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            assert f"'install', '{requirement}'" in log, f"Manager did not pip install {requirement}"
    assert "Install: pip packages" in log

    before = {name for name in server.get("/object_info") if name.startswith("FewStep")}
    assert not before, "new nodes should only appear after the restart"
    restart_through_manager(server)

    object_info = server.get("/object_info")
    expected = pack_node_ids(installed)
    assert {"FewStepScheduler", "FewStepSampler"} <= expected
    assert expected <= set(object_info), f"missing after restart: {expected - set(object_info)}"
    for node_id in expected:
        assert object_info[node_id]["python_module"] == f"custom_nodes.{PACK_FOLDER_NAME}"
    pack_lines = [line for line in server.log_text().splitlines() if PACK_FOLDER_NAME in line]
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], pack_lines


def test_manager_installs_the_pack_from_its_database_entry(pack_remote, tmp_path):
    """The default Manager UI's path: install task from the node database → git clone → pip → restart."""
    git_url, commit = pack_remote
    base = tmp_path / "base"
    # The default security level ("normal") allows installing a pack listed in the database.
    server = manager_server(base, {})
    seed_manager_database(base, git_url)
    with server:
        client_id = uuid.uuid4().hex
        task = {
            "ui_id": uuid.uuid4().hex, "client_id": client_id, "kind": "install",
            # Packs known by git URL only are installed as version "unknown", by the repository's name.
            "params": {"id": PACK_FOLDER_NAME, "version": "unknown", "selected_version": "unknown",
                       "mode": "cache", "channel": "default"},
        }
        done = asyncio.run(_run_manager_task(server, task, timeout=600))
        assert done["status"]["status_str"] == "success", done["result"]
        pack = server.get("/v2/customnode/installed").get(PACK_FOLDER_NAME)
        assert pack is not None and pack["ver"] == commit and pack["enabled"], pack
        check_installed_and_loaded(server, base, commit)


def test_manager_installs_the_pack_from_a_git_url(pack_remote, tmp_path):
    """The Manager's "Install via Git URL" (legacy UI's API): POST the URL → clone → pip → restart."""
    git_url, commit = pack_remote
    base = tmp_path / "base"
    # Installing from an arbitrary URL is a "high" risk action: on a loopback server the Manager allows
    # it from security level normal- down.
    server = manager_server(base, {"security_level": "normal-"}, "--enable-manager-legacy-ui")
    with server:
        status, _ = _post_text(server, "/v2/customnode/install/git_url", git_url)
        assert status == 200, server.log_text()[-3000:]
        check_installed_and_loaded(server, base, commit)


def test_manager_refuses_git_url_installs_at_its_default_security_level(pack_remote, tmp_path):
    """The same request at security level "normal" is refused: the test above needs normal-."""
    git_url, _ = pack_remote
    base = tmp_path / "base"
    server = manager_server(base, {}, "--enable-manager-legacy-ui")
    with server:
        status, _ = _post_text(server, "/v2/customnode/install/git_url", git_url)
        assert status == 403
        assert not (base / "custom_nodes" / PACK_FOLDER_NAME).exists()


def _post_text(server: ComfyServer, path: str, text: str, timeout: float = 600) -> tuple[int, str]:
    import urllib.request

    request = urllib.request.Request(server.url + path, data=text.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
