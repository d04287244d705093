/* The sidebar's model panel: what the server serves (polled from /api/model_status), the model
 * and adapter picker, and Load / Unload. Other modules read the last status with lastStatus(),
 * learn of a new one from the "mt:status" event, and of a load starting or ending from
 * "mt:model-busy"; modelReady() says whether a generation may start now.
 */
import { ApiError, apiFetch, describeFailure, postJson } from "./api.js";
import { catalogLoaded, fetchCatalog, getCatalog } from "./catalog.js";
import { byId, fileName } from "./dom.js";
import { formatBytes } from "./format.js";
import { bind, has, t } from "./i18n.js";
import { adapterNote, fillAdapterSelect, fillModelSelect, selectedModel } from "./picker.js";

const STATUS_POLL_MS = 3000;
const LOADING_POLL_MS = 1000;
const KNOWN_STATES = ["not_loaded", "loading", "loaded", "error"];

const els = {
  loadModel: byId("load-model"),
  unloadModel: byId("unload-model"),
  modelSelect: byId("model-select"),
  adapterSelect: byId("adapter-select"),
  pickerNote: byId("picker-note"),
  modelState: byId("model-state"),
  modelName: byId("model-name"),
  modelBackend: byId("model-backend"),
  modelAdapter: byId("model-adapter"),
  modelDevice: byId("model-device"),
  modelGpu: byId("model-gpu"),
  modelNCtx: byId("model-n-ctx"),
  modelQueue: byId("model-queue"),
  modelError: byId("model-error"),
  topbarModel: byId("topbar-model"),
};

let lastLoadError = null;
let modelBusy = false; // this page's load or unload request is in flight
let serverLoading = false; // the server says a load is under way (perhaps from another tab)
let status = null;
let unreachableReason = null;
// Bumped when a load or unload ends: a status fetched before then is older news than its answer.
let statusEpoch = 0;

export const lastStatus = () => status;
export const modelReady = () => !modelBusy && !serverLoading;

function announceBusy() {
  document.dispatchEvent(new CustomEvent("mt:model-busy", { detail: !modelReady() }));
}

// ---------------------------------------------------------------- status

function stateLabel(state) {
  return state && has(`state.${state}`) ? t(`state.${state}`) : state || t("state.unknown");
}

function showState(state) {
  const known = state === "unloading" ? "loading" : KNOWN_STATES.includes(state) ? state : "unknown";
  els.modelState.textContent = stateLabel(state);
  els.modelState.dataset.state = state || "";
  els.modelState.className = `badge state-${known}`;
}

function showModelError(text) {
  els.modelError.textContent = text || "";
  els.modelError.hidden = !text;
}

/** What is loaded, as one comparable value: the picker follows it when it changes. */
function loadedKey(value) {
  return value ? `${value.state}|${value.backend}|${value.model}|${value.adapter}` : "";
}

/**
 * Shows the server's status. With `follow`, a change of what is loaded also moves the picker
 * to it and retires this page's last load error; after a failed load the picker keeps the
 * user's choice instead, so they can correct it.
 */
function showStatus(next, follow = true) {
  const changed = follow && loadedKey(next) !== loadedKey(status);
  if (changed && status && !modelBusy) lastLoadError = null;
  status = next;

  showState(next.state);
  els.modelName.textContent = fileName(next.model);
  els.modelName.title = next.model || "";
  els.modelBackend.textContent = next.backend || "—";
  els.modelAdapter.textContent = next.adapter ? fileName(next.adapter) : t("model.no_adapter");
  els.modelAdapter.title = next.adapter || "";
  els.modelDevice.textContent = next.device || "—";
  els.modelGpu.textContent = gpuText(next.gpu);
  els.modelGpu.title = next.gpu?.note || "";
  els.modelNCtx.textContent = next.n_ctx != null ? String(next.n_ctx) : "—";
  const queue = next.queue;
  els.modelQueue.textContent = queue ? t("model.queue", { running: queue.running, waiting: queue.waiting }) : "—";
  showModelError(lastLoadError || next.error);
  const label = next.model_name || fileName(next.model);
  els.topbarModel.removeAttribute("data-i18n"); // from here on it names what the server has
  els.topbarModel.textContent = `${label} · ${stateLabel(next.state)}`;
  els.topbarModel.title = [next.model, next.adapter].filter(Boolean).join(" + ");

  serverLoading = next.state === "loading";
  announceBusy();
  document.dispatchEvent(new CustomEvent("mt:status", { detail: next }));
  // Loaded elsewhere (another tab, the API) by a path the list lacks: fetch the list again.
  if (changed && !modelBusy && !selectLoaded() && next.model && catalogLoaded()) refreshModels(true);
}

/** The GPU the model uses (its name, the layers on it, its memory there), or why it uses none. */
function gpuText(gpu) {
  if (!gpu) return "—";
  if (!gpu.name) return t("model.gpu_none", { why: gpu.note || "" });
  const parts = [gpu.name, t("model.gpu_layers", { n: gpu.layers_offloaded, total: gpu.layers_total ?? "?" })];
  if (gpu.memory_bytes != null) parts.push(t("model.gpu_memory", { size: formatBytes(gpu.memory_bytes) }));
  return parts.join(" · ");
}

function showUnreachable() {
  showState("unreachable");
  showModelError(t("model.status_unavailable", { reason: unreachableReason }));
  bind(els.topbarModel, "model.server_unreachable");
}

async function refreshStatus(follow = true) {
  const epoch = statusEpoch;
  try {
    const response = await apiFetch("/api/model_status", { cache: "no-store" });
    if (!response.ok) throw new ApiError(await describeFailure(response));
    const next = await response.json();
    if (epoch !== statusEpoch) return;
    unreachableReason = null;
    showStatus(next, follow);
  } catch (err) {
    if (epoch !== statusEpoch) return;
    unreachableReason = err.message;
    showUnreachable();
  }
}

export function pollStatus() {
  refreshStatus().finally(() => setTimeout(pollStatus, STATUS_POLL_MS));
}

// ---------------------------------------------------------------- the picker

function setPickerNote(text) {
  els.pickerNote.textContent = text || "";
  els.pickerNote.hidden = !text;
}

/** Fills the adapter select for the chosen model, keeping `wanted` (a path) selected if it fits. */
function renderAdapters(wanted) {
  const catalog = getCatalog();
  const model = selectedModel(els.modelSelect);
  const fitting = fillAdapterSelect(els.adapterSelect, model, catalog, wanted);
  els.adapterSelect.disabled = fitting.length === 0 || modelBusy;
  setPickerNote(adapterNote(model, fitting, catalog));
}

/**
 * Builds the model select from the catalog. With `follow` it then selects what is loaded;
 * without, it keeps the user's choice.
 */
function renderModels(follow) {
  const catalog = getCatalog();
  const previous = els.modelSelect.value;
  const previousAdapter = els.adapterSelect.value;
  // A model loaded by a path the catalog does not list still shows as what is loaded.
  const extra = [];
  if (status && status.model && !catalog.models.some((model) => model.path === status.model)) {
    extra.push({ model: { id: status.model, name: fileName(status.model), backend: status.backend || "other", path: status.model,
                          available: true, external: true }, text: `${fileName(status.model)} ${t("picker.by_path")}` });
  }
  fillModelSelect(els.modelSelect, catalog, extra);
  const keep = previous && Array.from(els.modelSelect.options).some((o) => o.value === previous && !o.disabled);
  if ((follow || !keep) && selectLoaded()) return;
  if (keep) els.modelSelect.value = previous;
  renderAdapters(previousAdapter);
}

/** Points the selects at what the server says is loaded; false when the list does not have it. */
function selectLoaded() {
  const option = status && Array.from(els.modelSelect.options).find((o) => o.model && o.model.path === status.model);
  if (!option) {
    renderAdapters("");
    return false;
  }
  els.modelSelect.value = option.value;
  renderAdapters(status.adapter || "");
  return true;
}

export async function refreshModels(follow = true) {
  try {
    await fetchCatalog();
    renderModels(follow);
  } catch (err) {
    setPickerNote(t("picker.list_unavailable", { reason: err.message }));
  }
}

// ---------------------------------------------------------------- load and unload

function setModelBusy(busy) {
  modelBusy = busy;
  els.loadModel.disabled = busy;
  els.unloadModel.disabled = busy;
  els.modelSelect.disabled = busy;
  if (busy) els.adapterSelect.disabled = true;
  else renderAdapters(els.adapterSelect.value);
  announceBusy();
}

/** Runs one load or unload request; the status it answers with (or its error) updates the panel. */
async function changeModel(url, body, busyState) {
  if (modelBusy) return;
  let succeeded = false;
  setModelBusy(true);
  lastLoadError = null;
  showModelError("");
  showState(busyState);
  // The load's elapsed time ticks in the system panel while the request is out.
  const ticker = setInterval(() => refreshStatus(false), LOADING_POLL_MS);
  const settled = () => {
    clearInterval(ticker);
    statusEpoch += 1;
  };
  try {
    const answer = await postJson(url, body);
    settled();
    succeeded = true;
    setModelBusy(false);
    status = null; // follow what the server now has, even if it is what it had
    showStatus(answer);
  } catch (err) {
    settled();
    lastLoadError = t(url.endsWith("unload_model") ? "model.unload_failed" : "model.load_failed", { reason: err.message });
    showModelError(lastLoadError);
    setModelBusy(false);
    await refreshStatus(false);
  } finally {
    await refreshModels(succeeded);
  }
}

export function loadModel() {
  const model = selectedModel(els.modelSelect);
  if (!model) {
    lastLoadError = t("model.choose");
    showModelError(lastLoadError);
    return Promise.resolve();
  }
  const body = { model: model.external ? model.path : model.id, backend: model.backend };
  if (els.adapterSelect.value) body.adapter = els.adapterSelect.value;
  return changeModel("/api/load_model", body, "loading");
}

export function unloadModel() {
  return changeModel("/api/unload_model", {}, "unloading");
}

els.loadModel.addEventListener("click", loadModel);
els.unloadModel.addEventListener("click", unloadModel);
els.modelSelect.addEventListener("change", () => renderAdapters(els.adapterSelect.value));

// Text the page composed itself follows a language switch; model output never changes.
document.addEventListener("mt:lang", () => {
  if (unreachableReason !== null) showUnreachable();
  else if (status) showStatus(status, false);
  if (catalogLoaded()) renderModels(false);
  if (lastLoadError) showModelError(lastLoadError);
});
