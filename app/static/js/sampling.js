/* The sidebar's generation settings, shared by every view: the sampling sliders and the system
 * prompt. Views read them here, never from the sidebar's elements.
 */
import { byId } from "./dom.js";

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
