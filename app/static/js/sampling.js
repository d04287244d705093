/* The sidebar's sampling settings: the sliders and what generation bodies make of them. */
import { byId } from "./dom.js";

const inputs = { temperature: byId("temperature"), topP: byId("top-p"), maxTokens: byId("max-tokens") };

/** The sampling settings, as generation bodies and exported conversations name them. */
export function generationParams() {
  return {
    max_new_tokens: Number(inputs.maxTokens.value),
    temperature: Number(inputs.temperature.value),
    top_p: Number(inputs.topP.value),
  };
}

function setSlider(input, value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return;
  input.value = String(value);
  input.dispatchEvent(new Event("input", { bubbles: true }));
}

/** Puts back the settings a stored conversation was had with. */
export function restoreParams(params = {}) {
  setSlider(inputs.temperature, params.temperature);
  setSlider(inputs.topP, params.top_p);
  setSlider(inputs.maxTokens, params.max_new_tokens);
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
