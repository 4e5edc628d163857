"""Chinese node names, tooltips and help pages, held to the node definitions ComfyUI serves.

English comes from the nodes' own schemas; `locales/zh/nodeDefs.json` is what ComfyUI's server
(app/custom_node_manager.py) hands the frontend under `nodeDefs`, keyed as the frontend reads it:
display_name, description, inputs.<input>.{name, tooltip}, outputs.<index>.{name, tooltip}. The
tooltips state per-family facts generated from fewstep/families.py, so every number and family name
in an English text must appear as often in its Chinese one: a family whose steps change fails here
until the translation follows. Help pages are what the frontend fetches for a custom node:
web/docs/<node>/<locale>.md, else web/docs/<node>.md.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from comfy_harness import PACK_FOLDER_NAME, PACK_ROOT

from comfyui_fewstep.fewstep.families import FAMILIES, FAMILY_NAMES
from comfyui_fewstep.fewstep.schedules import reference_timesteps

ZH = PACK_ROOT / "locales" / "zh"
NODE_DEFS = ZH / "nodeDefs.json"
DOCS = PACK_ROOT / "web" / "docs"
HELP_LOCALES = ("zh",)
# "-1" (eta's "the family's reference"), "1.0", "512" of "512²", the digits inside "sdv1-5" or "dmd2".
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
FAMILY_NAME = re.compile(r"\b(?:" + "|".join(sorted(FAMILY_NAMES, key=len, reverse=True)) + r")\b")


@pytest.fixture(scope="module")
def node_infos(comfy) -> dict[str, dict]:
    """What ComfyUI's /object_info says of each node this pack registers, by node id."""
    module = f"custom_nodes.{PACK_FOLDER_NAME}"
    infos = {}
    for name, node_class in comfy.nodes.NODE_CLASS_MAPPINGS.items():
        if getattr(node_class, "RELATIVE_PYTHON_MODULE", None) == module:
            infos[name] = node_class.GET_NODE_INFO_V1()
    assert infos, f"no node of {module} found in ComfyUI's NODE_CLASS_MAPPINGS"
    return infos


@pytest.fixture(scope="module")
def zh_node_defs() -> dict:
    return json.loads(NODE_DEFS.read_text(encoding="utf-8"))


def english_texts(info: dict) -> dict[str, str | None]:
    """Every translatable text of a node, by its key in nodeDefs.json (None: a name-only entry)."""
    texts: dict[str, str | None] = {"display_name": info["display_name"]}
    if info.get("description"):
        texts["description"] = info["description"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            texts[f"inputs.{name}.name"] = name
            if options.get("tooltip"):
                texts[f"inputs.{name}.tooltip"] = options["tooltip"]
    tooltips = info.get("output_tooltips") or [None] * len(info["output"])
    for index, (name, tooltip) in enumerate(zip(info["output_name"], tooltips)):
        texts[f"outputs.{index}.name"] = name
        if tooltip:
            texts[f"outputs.{index}.tooltip"] = tooltip
    return texts


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return keys


def missing_facts(english: str, chinese: str) -> list[str]:
    """Numbers and family names the English text has more often than the Chinese one."""
    missing = []
    for pattern in (NUMBER, FAMILY_NAME):
        have = Counter(pattern.findall(chinese))
        for token, count in Counter(pattern.findall(english)).items():
            if have[token] < count:
                missing.append(f"'{token}' ×{count - have[token]}")
    return missing


def test_every_node_input_and_output_has_a_chinese_entry(node_infos, zh_node_defs):
    where = NODE_DEFS.relative_to(PACK_ROOT)
    problems = []
    for node, info in node_infos.items():
        for key, english in english_texts(info).items():
            chinese = lookup(zh_node_defs.get(node, {}), key)
            if not isinstance(chinese, str) or not chinese.strip():
                problems.append(f"add {node}.{key} to {where} (English: {english!r})")
    assert not problems, "missing Chinese translations:\n" + "\n".join(problems)


def test_chinese_entries_name_only_what_the_nodes_have(node_infos, zh_node_defs):
    where = NODE_DEFS.relative_to(PACK_ROOT)
    stale = [f"remove {node} from {where}: no such node" for node in zh_node_defs if node not in node_infos]
    for node, info in node_infos.items():
        known = set(english_texts(info))
        stale += [f"remove {node}.{key} from {where}: the node has no such text"
                  for key in sorted(leaf_keys(zh_node_defs.get(node, {}))) if key not in known]
    assert not stale, "\n".join(stale)


def test_chinese_texts_keep_every_number_and_family_of_the_english(node_infos, zh_node_defs):
    """The English tooltips are generated from fewstep/families.py; a Chinese one that lost or changed
    a number (steps, eta, timesteps, guidance) or a family name no longer says the same thing."""
    where = NODE_DEFS.relative_to(PACK_ROOT)
    problems = []
    for node, info in node_infos.items():
        for key, english in english_texts(info).items():
            chinese = lookup(zh_node_defs.get(node, {}), key)
            if english is None or not isinstance(chinese, str) or key.endswith(".name"):
                continue
            missing = missing_facts(english, chinese)
            if missing:
                problems.append(f"update {node}.{key} in {where}: it lacks {', '.join(missing)} of the "
                                f"English:\n    {english}\n    {chinese}")
    assert not problems, "Chinese texts out of step with the nodes:\n" + "\n".join(problems)


@pytest.mark.parametrize("node", ["FewStepScheduler", "FewStepSampler", "FewStepKSampler"])
def test_sampling_node_titles_name_every_family(node_infos, node):
    """The frontend's node search matches the display name (and the node id): each family's own name
    in fewstep/families.py holds one of the words in the sampling nodes' titles, so a new family
    fails here until the title names it."""
    words = re.split(r"[,;]\s*", re.search(r"\((.*)\)", node_infos[node]["display_name"]).group(1))
    unnamed = [family.display_name for family in FAMILIES.values()
               if not any(word in family.display_name for word in words)]
    assert not unnamed, f"{node}'s display name names none of {unnamed} (its words: {words})"


def test_fact_check_sees_a_changed_number():
    """The comparison itself: a Chinese text with one step count changed is caught."""
    english = "Sampling steps. The cards: lcm 4, tcd 4, turbo 1."
    assert missing_facts(english, "采样步数。模型卡：lcm 4、tcd 4、turbo 1。") == []
    assert missing_facts(english, "采样步数。模型卡：lcm 4、tcd 2、turbo 1。") == ["'4' ×1"]
    assert missing_facts(english, "采样步数。模型卡：lcm 4、4、turbo 1。") == ["'tcd' ×1"]


def test_zh_main_json_translates_the_category(node_infos):
    """The frontend shows each part of a node's category through nodeCategories.<part>."""
    categories = json.loads((ZH / "main.json").read_text(encoding="utf-8"))["nodeCategories"]
    parts = {part for info in node_infos.values() for part in info["category"].split("/")}
    ours = {part for part in parts if "few-step" in part}
    assert ours and ours <= set(categories), f"add {sorted(ours - set(categories))} to locales/zh/main.json nodeCategories"


def test_every_node_has_an_english_and_a_chinese_help_page(node_infos):
    missing = [f"web/docs/{node}.md" for node in node_infos if not (DOCS / f"{node}.md").is_file()]
    missing += [f"web/docs/{node}/{locale}.md" for node in node_infos for locale in HELP_LOCALES
                if not (DOCS / node / f"{locale}.md").is_file()]
    assert not missing, "write the help pages " + ", ".join(missing)
    stale = sorted(path.stem for path in DOCS.glob("*.md") if path.stem not in node_infos)
    assert not stale, f"help pages for nodes the pack does not register: {stale}"


FAMILY_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|([^|]*)\|([^|]*)\|([^|]*)\|", re.MULTILINE)


def help_family_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """A page's family table: `family` | steps | timesteps | cfg | ..."""
    return {name: tuple(cell.strip() for cell in cells) for name, *cells in FAMILY_ROW.findall(text)
            if name in FAMILIES}


@pytest.mark.parametrize("page", ["FewStepScheduler.md", "FewStepScheduler/zh.md",
                                  "FewStepKSampler.md", "FewStepKSampler/zh.md"])
def test_help_family_tables_are_fewstep_families(page):
    """The family table on a help page: every family, with its card's steps, the timesteps FewStep
    samples at those steps, and its cfg, as fewstep/families.py and schedules.py give them (a
    flow-matching family's σ depend on the image size: its row names no timesteps)."""
    rows = help_family_rows((DOCS / page).read_text(encoding="utf-8"))
    assert list(rows) == list(FAMILIES), f"web/docs/{page}: the family table must list {list(FAMILIES)}"
    for name, (steps, timesteps, cfg) in rows.items():
        family = FAMILIES[name]
        if family.timestep_rule == "flow":
            expected = timesteps
        else:
            expected = ", ".join(str(t) for t in reference_timesteps(name, family.default_steps, 1.0, None))
        assert (steps, timesteps, cfg) == (str(family.default_steps), expected, f"{family.default_cfg:g}"), (
            f"web/docs/{page}, row {name}: steps {family.default_steps}, timesteps {expected}, "
            f"cfg {family.default_cfg:g} (fewstep/families.py)")
