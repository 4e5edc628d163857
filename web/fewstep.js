// FewStep's frontend: when a node's few-step family changes, or a FewStep loader's file says which
// family it is (when the user picks the file, and again in the loader's `executed` message when it
// runs), the steps / cfg / eta widgets that follow it move to the reference values — except those the
// user set by hand — and a badge on the node shows the reference. For FLUX.1-dev's families the
// guidance of the Flux Guidance node on the sampler's positive prompt follows too; the badge shows the
// σ shift the family's scheduler applies itself (no ModelSampling node's shift changes FewStep's σ).
//
// Nothing about the families is kept here: GET /fewstep/families serves fewstep/families.py and
// GET /fewstep/detect the loaders' own detection. Widgets only move on a user's change or a loader's
// `executed` message, never while a workflow is opened, so saved workflows open as they were saved.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION_NAME = "FewStep.ReferenceDefaults";
const FAMILIES_ROUTE = "/fewstep/families";
const DETECT_ROUTE = "/fewstep/detect";
// node.properties key: the names of the widgets the user set by hand; saved with the workflow.
export const HAND_SET_PROPERTY = "fewstep_hand_set";
const FOLLOWING_WIDGETS = ["steps", "cfg", "eta", "guidance"];
const SETTINGS_TYPE = "FEWSTEP_SETTINGS";
// ComfyUI's own nodes whose cfg follows the FewStep sampler feeding their `sampler` input.
const CFG_FOLLOWERS = new Set(["SamplerCustom"]);
// ComfyUI's nodes whose guidance follows the family (FLUX.1-dev's distilled guidance), found upstream of
// the positive prompt of a SamplerCustom a Few-Step Sampler feeds, or of a Few-Step KSampler.
const GUIDANCE_FOLLOWERS = new Set(["FluxGuidance"]);
const CONDITIONING_HOPS = 8; // how far up (or down) a chain of conditioning nodes the search goes

let families = null;
let loaderFiles = {}; // loader node type → the widget naming its file (nodes/routes.py LOADER_FILES)
let DETECT = null; // the loaders' family value "read the family from the file" (fewstep/detection.py)
let ETA_FROM_FAMILY = null; // the eta inputs' "use the reference" (fewstep/families.py)
const familiesReady = api
  .fetchApi(FAMILIES_ROUTE)
  .then((response) => {
    if (!response.ok) throw new Error(`${FAMILIES_ROUTE}: HTTP ${response.status}`);
    return response.json();
  })
  .then((payload) => {
    families = payload.families;
    loaderFiles = payload.loaders ?? {};
    DETECT = payload.detect;
    ETA_FROM_FAMILY = payload.eta_from_family;
    return families;
  })
  .catch((error) => {
    console.warn(`[FewStep] reference settings unavailable, widgets will not follow the family: ${error}`);
    return null;
  });

const classOf = (node) => node?.comfyClass ?? node?.type;
const isFewStep = (node) => classOf(node)?.startsWith("FewStep") ?? false;
const widgetNamed = (node, name) => node?.widgets?.find((widget) => widget.name === name);
const isLoader = (node) => isFewStep(node) && (node.outputs ?? []).some((output) => output.type === SETTINGS_TYPE);
const formatNumber = (value) => String(Number(Number(value).toFixed(3)));

function graphLink(graph, linkId) {
  if (linkId == null || !graph) return null;
  return graph.getLink?.(linkId) ?? graph.links?.get?.(linkId) ?? graph.links?.[linkId] ?? null;
}

// The nodes fed by `node`'s outputs of `type`.
function nodesFedBy(node, type) {
  const fed = [];
  for (const output of node.outputs ?? []) {
    if (output.type !== type) continue;
    for (const linkId of output.links ?? []) {
      const target = node.graph?.getNodeById(graphLink(node.graph, linkId)?.target_id);
      if (target && !fed.includes(target)) fed.push(target);
    }
  }
  return fed;
}

// The node feeding `node`'s input of `type`, if any.
function nodeFeeding(node, type) {
  const input = (node.inputs ?? []).find((slot) => slot.type === type && slot.link != null);
  const link = graphLink(node.graph, input?.link);
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

// The Flux Guidance node on `sampler`'s positive prompt: its positive input, then up CONDITIONING inputs.
function guidanceFeeding(sampler) {
  let current = sampler;
  for (let hop = 0; hop < CONDITIONING_HOPS && current; hop++) {
    const input = (current.inputs ?? []).find(
      (slot) => (hop === 0 ? slot.name === "positive" : slot.type === "CONDITIONING") && slot.link != null,
    );
    const link = graphLink(current.graph, input?.link);
    current = link ? current.graph.getNodeById(link.origin_id) : null;
    if (current && GUIDANCE_FOLLOWERS.has(classOf(current))) return current;
  }
  return null;
}

// The sampler a Flux Guidance node's conditioning reaches (down CONDITIONING outputs).
function samplerFedBy(node) {
  let frontier = [node];
  for (let hop = 0; hop < CONDITIONING_HOPS && frontier.length; hop++) {
    frontier = frontier.flatMap((current) => nodesFedBy(current, "CONDITIONING"));
    const sampler = frontier.find((fed) => CFG_FOLLOWERS.has(classOf(fed)) || classOf(fed) === "FewStepKSampler");
    if (sampler) return sampler;
  }
  return null;
}

// A widget converted to an input and linked takes its value from the link, not from us.
const widgetIsLinked = (node, name) =>
  (node.inputs ?? []).some((slot) => slot.widget?.name === name && slot.link != null);

function handSet(node) {
  return new Set(node.properties?.[HAND_SET_PROPERTY] ?? []);
}

function setHandSet(node, names) {
  node.properties ??= {};
  if (names.size) node.properties[HAND_SET_PROPERTY] = [...names].sort();
  else delete node.properties[HAND_SET_PROPERTY];
}

// The family a node samples with: a connected loader's (its explicit family, else what it detected
// in the file the last time it ran), else the node's own family widget — as resolve_family does.
function effectiveReference(node) {
  const loader = isLoader(node) ? node : nodeFeeding(node, SETTINGS_TYPE);
  if (loader) {
    const chosen = widgetNamed(loader, "family")?.value;
    if (chosen && chosen !== DETECT && families?.[chosen]) return { family: chosen, settings: null, loader };
    if (loader.fewstepDetected?.family) return { family: loader.fewstepDetected.family, settings: loader.fewstepDetected, loader };
  }
  if (CFG_FOLLOWERS.has(classOf(node))) {
    const sampler = nodeFeeding(node, "SAMPLER");
    return isFewStep(sampler) ? effectiveReference(sampler) : null;
  }
  if (GUIDANCE_FOLLOWERS.has(classOf(node))) {
    const sampler = samplerFedBy(node);
    return sampler ? effectiveReference(sampler) : null;
  }
  const family = widgetNamed(node, "family")?.value;
  return family && families?.[family] ? { family, settings: null, loader: null } : null;
}

// The reference value of each following widget for a family (a loader's detected settings win: a
// 4-step Hyper-SD LoRA says 4 steps where the family's default is 8).
export function referenceValues(family, settings) {
  const definition = families?.[family];
  if (!definition) return null;
  return {
    steps: settings?.steps ?? definition.default_steps,
    cfg: settings?.cfg ?? definition.default_cfg,
    eta: settings?.eta ?? definition.default_eta ?? ETA_FROM_FAMILY,
    guidance: definition.guidance ?? null, // null: the family has no distilled guidance to follow
    shift: definition.shift ?? null, // a number, "dynamic" (by image size), or null (not flow-matching)
  };
}

export function referenceText(family, settings) {
  const values = referenceValues(family, settings);
  if (!values) return "";
  const definition = families[family];
  const parts = [`${values.steps} step${values.steps === 1 ? "" : "s"}`, `cfg ${formatNumber(values.cfg)}`];
  if (values.eta !== ETA_FROM_FAMILY) parts.push(`eta ${formatNumber(values.eta)}`);
  if (values.guidance != null) parts.push(`guidance ${formatNumber(values.guidance)}`);
  if (values.shift === "dynamic") parts.push("dynamic shift");
  else if (values.shift != null) parts.push(`shift ${formatNumber(values.shift)}`);
  if (definition.only_steps) parts[0] += " only";
  return `${family}: ${parts.join(", ")}`;
}

let noBadge = null;
const NO_BADGE = () => (noBadge ??= new window.LGraphBadge({ text: "" }));

function refreshBadge(node) {
  const reference = effectiveReference(node);
  const text = reference && isFewStep(node) ? referenceText(reference.family, reference.settings) : "";
  if (node.fewstepReference === text) return;
  node.fewstepReference = text;
  node.fewstepBadge = text && window.LGraphBadge
    ? new window.LGraphBadge({ text, fgColor: "#dfe8ff", bgColor: "#2b4a7a" })
    : null;
  node.setDirtyCanvas?.(true, true);
}

function refreshBadgesFrom(node) {
  refreshBadge(node);
  for (const fed of nodesFedBy(node, SETTINGS_TYPE)) refreshBadge(fed);
}

function setWidget(node, name, value) {
  const widget = widgetNamed(node, name);
  if (!widget || value == null || widgetIsLinked(node, name) || handSet(node).has(name)) return false;
  const { min, max } = widget.options ?? {};
  if ((min != null && value < min) || (max != null && value > max)) return false;
  if (widget.value === value) return false;
  widget.value = value;
  return true;
}

// Move `node`'s following widgets (and the cfg of the SamplerCustom its sampler feeds, and the guidance
// of the Flux Guidance on that sampler's positive prompt) to the reference.
function moveToReference(node, family, settings) {
  const values = referenceValues(family, settings);
  if (!values) return;
  for (const name of FOLLOWING_WIDGETS) setWidget(node, name, values[name]);
  const samplers = classOf(node) === "FewStepKSampler" ? [node] : [];
  for (const follower of nodesFedBy(node, "SAMPLER")) {
    if (!CFG_FOLLOWERS.has(classOf(follower))) continue;
    setWidget(follower, "cfg", values.cfg);
    samplers.push(follower);
  }
  for (const sampler of samplers) {
    const guidance = guidanceFeeding(sampler);
    if (guidance) setWidget(guidance, "guidance", values.guidance);
  }
  refreshBadge(node);
  node.setDirtyCanvas?.(true, true);
}

// A loader's family (chosen, or detected in the file) reaches the nodes its settings output feeds:
// their family widget shows it, as their execute() uses it, and their widgets move to its reference.
function followLoader(loader, family, settings) {
  refreshBadge(loader);
  for (const fed of nodesFedBy(loader, SETTINGS_TYPE)) {
    if (!isFewStep(fed)) continue;
    const familyWidget = widgetNamed(fed, "family");
    if (familyWidget && families?.[family]) familyWidget.value = family;
    moveToReference(fed, family, settings);
  }
}

// What a loader will detect in its file when it runs (the server reads the name and metadata).
async function detectFile(loader) {
  const name = widgetNamed(loader, loaderFiles[classOf(loader)])?.value;
  if (!name) return null;
  const ticket = (loader.fewstepDetectTicket = (loader.fewstepDetectTicket ?? 0) + 1);
  const query = new URLSearchParams({ node: classOf(loader), name, family: widgetNamed(loader, "family")?.value ?? DETECT });
  const response = await api.fetchApi(`${DETECT_ROUTE}?${query}`);
  if (!response.ok) return null;
  const { settings } = await response.json();
  return ticket === loader.fewstepDetectTicket ? settings : null; // null: a later choice or run won
}

// Learn what the loader's file says: on a user's choice the fed widgets follow it; while a workflow
// is opened only the badges do.
async function learnFile(loader, follow) {
  let settings;
  try {
    settings = await detectFile(loader);
  } catch (error) {
    console.warn(`[FewStep] ${DETECT_ROUTE}: ${error}`);
  }
  if (!settings) return;
  loader.fewstepDetected = settings;
  if (follow && settings.family && families?.[settings.family]) followLoader(loader, settings.family, settings);
  else refreshBadgesFrom(loader);
}

function onFamilyChosen(node, family) {
  if (isLoader(node)) {
    if (family !== DETECT) followLoader(node, family, null);
    else {
      node.fewstepDetected = null;
      refreshBadgesFrom(node);
      learnFile(node, true);
    }
    return;
  }
  const reference = effectiveReference(node);
  // With a loader connected its family wins (resolve_family); the widget's value is not used.
  if (reference?.loader) refreshBadge(node);
  else moveToReference(node, family, null);
}

// Record a hand change of a following widget; setting it back to the reference lets it follow again.
function onFollowingWidgetChanged(node, name, value) {
  const reference = effectiveReference(node);
  if (!reference && !isFewStep(node)) return; // a SamplerCustom not fed by a FewStep sampler
  const names = handSet(node);
  const referenceValue = reference ? referenceValues(reference.family, reference.settings)?.[name] : undefined;
  if (referenceValue != null && Number(value) === Number(referenceValue)) names.delete(name);
  else names.add(name);
  setHandSet(node, names);
}

function wrapCallback(widget, after) {
  const original = widget.callback;
  widget.callback = function (value, ...rest) {
    const result = original?.apply(this, [value, ...rest]);
    try {
      after(widget.value);
    } catch (error) {
      console.error("[FewStep]", error);
    }
    return result;
  };
}

function watchNode(node) {
  const follows = isFewStep(node) || CFG_FOLLOWERS.has(classOf(node)) || GUIDANCE_FOLLOWERS.has(classOf(node));
  if (!follows || node.fewstepWatched) return;
  node.fewstepWatched = true;
  const familyWidget = isFewStep(node) ? widgetNamed(node, "family") : null;
  if (familyWidget) {
    wrapCallback(familyWidget, (value) => familiesReady.then(() => onFamilyChosen(node, value)));
  }
  for (const name of FOLLOWING_WIDGETS) {
    const widget = widgetNamed(node, name);
    if (widget) wrapCallback(widget, (value) => onFollowingWidgetChanged(node, name, value));
  }
  if (isFewStep(node)) {
    node.badges ??= [];
    node.badges.push(() => node.fewstepBadge ?? NO_BADGE());
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function (...args) {
      const result = onConnectionsChange?.apply(this, args);
      if (families) refreshBadgesFrom(node);
      return result;
    };
  }
  familiesReady.then(() => {
    refreshBadge(node);
    if (!isLoader(node)) return;
    const fileWidget = widgetNamed(node, loaderFiles[classOf(node)]);
    if (fileWidget) wrapCallback(fileWidget, () => learnFile(node, true));
    learnFile(node, false);
  });
}

// Where ComfyUI's `executed` message names a node: its id, or a subgraph path "outer:inner".
function nodeByExecutionId(id) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(Number(part)) ?? graph?.getNodeById(part);
    graph = node?.subgraph;
  }
  return node;
}

app.registerExtension({
  name: EXTENSION_NAME,
  async setup() {
    await familiesReady;
    api.addEventListener("executed", ({ detail }) => {
      const settings = detail?.output?.fewstep_settings?.[0];
      if (!settings) return;
      const loader = nodeByExecutionId(detail.display_node ?? detail.node);
      if (!loader) return;
      loader.fewstepDetected = settings;
      loader.fewstepDetectTicket = (loader.fewstepDetectTicket ?? 0) + 1; // what it ran with wins
      if (settings.family && families?.[settings.family]) followLoader(loader, settings.family, settings);
      else refreshBadgesFrom(loader);
    });
    for (const node of (app.rootGraph ?? app.graph)?.nodes ?? []) refreshBadge(node);
  },
  nodeCreated(node) {
    watchNode(node);
  },
  loadedGraphNode(node) {
    watchNode(node);
    familiesReady.then(() => {
      refreshBadge(node);
      if (isLoader(node)) learnFile(node, false); // its file as saved, now that the values are set
    });
  },
});
