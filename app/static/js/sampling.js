/* The sidebar's generation settings, shared by every view: the sampling sliders, the system
 * prompt, and what the answer is held to (a JSON schema) or offered (tools). Views read them
 * here, never from the sidebar's elements.
 */
import { byId, makeElement } from "./dom.js";
import { bind, t } from "./i18n.js";

const inputs = { temperature: byId("temperature"), topP: byId("top-p"), maxTokens: byId("max-tokens") };
const systemPrompt = byId("system");

/**
 * The settings as a generation body takes them: the sampling values under the names generation
 * bodies and exported conversations use, and the system prompt unless it is blank.
 */
export function generationSettings() {
  const settings = {
    max_new_tokens: Number(inputs.maxTokens.value),
    temperature: Number(inputs.temperature.value),
    top_p: Number(inputs.topP.value),
  };
  if (systemPrompt.value.trim()) settings.system = systemPrompt.value;
  return settings;
}

function setSlider(input, value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return;
  input.value = String(value);
  input.dispatchEvent(new Event("input", { bubbles: true }));
}

/** Puts back the settings a stored conversation was had with: its sampling values and system prompt. */
export function restoreSettings({ params = {}, system = "" }) {
  setSlider(inputs.temperature, params.temperature);
  setSlider(inputs.topP, params.top_p);
  setSlider(inputs.maxTokens, params.max_new_tokens);
  systemPrompt.value = system;
}

function bindSlider(input, decimals) {
  const output = byId(`${input.id}-value`);
  const show = () => {
    output.textContent = Number(input.value).toFixed(decimals);
  };
  input.addEventListener("input", show);
  show();
}

bindSlider(inputs.temperature, 2);
bindSlider(inputs.topP, 2);
bindSlider(inputs.maxTokens, 0);

// ---------------------------------------------------------------- structured output and tools

const schemaBox = byId("json-schema");
const toolsBox = byId("tools");
const toolChoice = byId("tool-choice");
const FIXED_CHOICES = ["auto", "required", "none"];

/** A box's JSON, or undefined when it is blank; throws an Error naming the box when it is no JSON. */
function boxJson(box, nameKey) {
  const text = box.value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(t("structured.bad_json", { box: t(nameKey), reason: err.message }));
  }
}

/** The tools box as OpenAI's tools: a list of functions, each bare ({name, parameters}) or wrapped ({type, function}). */
function parseTools() {
  const value = boxJson(toolsBox, "structured.tools");
  if (value === undefined) return [];
  const list = Array.isArray(value) ? value : [value];
  return list.map((entry) => {
    const fn = entry && typeof entry === "object" && entry.type === "function" ? entry.function : entry;
    if (!fn || typeof fn !== "object" || typeof fn.name !== "string" || !fn.name) throw new Error(t("structured.tools_not_list"));
    return { type: "function", function: fn };
  });
}

function parseSchema() {
  const value = boxJson(schemaBox, "structured.schema");
  if (value !== undefined && (value === null || typeof value !== "object" || Array.isArray(value))) {
    throw new Error(t("structured.schema_not_object"));
  }
  return value;
}

function showBoxError(box, err) {
  const note = byId(`${box.id}-error`);
  note.textContent = err ? err.message : "";
  note.hidden = !err;
  box.setAttribute("aria-invalid", String(Boolean(err)));
}

/** The tool choice offers auto, required and none, and one entry per function in the tools box. */
function refreshToolChoice(tools) {
  const chosen = toolChoice.value;
  for (const option of Array.from(toolChoice.options)) {
    if (!FIXED_CHOICES.includes(option.value)) option.remove();
  }
  for (const tool of tools) {
    const option = makeElement("option");
    option.value = `function:${tool.function.name}`;
    bind(option, "structured.choice_function", { name: tool.function.name });
    toolChoice.append(option);
  }
  toolChoice.value = Array.from(toolChoice.options).some((o) => o.value === chosen) ? chosen : "auto";
  toolChoice.disabled = !tools.length;
}

/**
 * What the answer is held to or offered: response_format from the JSON schema box, tools and
 * tool_choice from the tools box. Throws an Error (in the page's language) naming the box that
 * does not parse, so a turn never goes out without what the user asked for.
 */
export function structuredSettings() {
  const settings = {};
  const schema = parseSchema();
  if (schema !== undefined) {
    settings.response_format = { type: "json_schema", json_schema: { name: "schema", schema, strict: true } };
  }
  const tools = parseTools();
  if (tools.length) {
    settings.tools = tools;
    const choice = toolChoice.value;
    settings.tool_choice = choice.startsWith("function:")
      ? { type: "function", function: { name: choice.slice("function:".length) } } : choice;
  }
  return settings;
}

schemaBox.addEventListener("input", () => {
  try {
    parseSchema();
    showBoxError(schemaBox, null);
  } catch (err) {
    showBoxError(schemaBox, err);
  }
});
toolsBox.addEventListener("input", () => {
  try {
    refreshToolChoice(parseTools());
    showBoxError(toolsBox, null);
  } catch (err) {
    showBoxError(toolsBox, err);
  }
});
refreshToolChoice([]);
