/* Compare mode: 2 to 4 columns, each a model (and adapter) loaded as a compare slot on the
 * server, all answering the same prompt at once. Each column streams on its own EventSource,
 * shows its figures when done, and can highlight word by word where it differs from column 1.
 */
import { bind, t } from "./i18n.js";
import { newRequestId, requestJson, stopWithGrace, streamTurn } from "./api.js";
import { byId, fileName, makeElement, wireComposer } from "./dom.js";
import { makeFigures } from "./format.js";
import { SlotList } from "./picker.js";
import { getCatalog } from "./catalog.js";
import { lastStatus } from "./model-panel.js";
import { blindRound } from "./arena.js";
import { generationSettings, structuredSettings } from "./sampling.js";
import { loadedSlots, setLoadedSlots } from "./compare-slots.js";
import { TOP_ALTERNATIVES, probabilitiesOn, tokenView } from "./tokens.js";
import { callMessage, renderToolCalls } from "./tool-calls.js";

const MIN_COLUMNS = 2;
const MAX_COLUMNS = 4;
// The word diff is quadratic in the answers' lengths; past this many word pairs it would stall the page.
const MAX_DIFF_CELLS = 4e6;

const els = {
  setup: byId("compare-setup"),
  summary: byId("compare-setup-summary"),
  pickers: byId("compare-pickers"),
  add: byId("compare-add"),
  load: byId("compare-load"),
  unload: byId("compare-unload"),
  progress: byId("compare-progress"),
  progressText: byId("compare-progress-text"),
  error: byId("compare-error"),
  stale: byId("compare-stale"),
  columns: byId("compare-columns"),
  empty: byId("compare-empty"),
  head: byId("compare-head"),
  rounds: byId("compare-rounds"),
  composer: byId("compare-composer"),
  prompt: byId("compare-prompt"),
  send: byId("compare-send"),
  stop: byId("compare-stop"),
  clear: byId("compare-clear"),
  multiTurn: byId("compare-multiturn"),
  diff: byId("compare-diff"),
  blind: byId("compare-blind"),
};

/** Each round: the prompt and one cell per column. */
let rounds = [];
/** Each slot's own conversation, sent with the next prompt when "multi-turn" is on. */
let histories = new Map();
let loading = false;
let running = null; // the round whose columns are still streaming

const slotList = new SlotList(els.pickers, {
  min: MIN_COLUMNS,
  max: MAX_COLUMNS,
  cardKey: "slots.column",
  onChange: () => updateControls(),
});

// ---------------------------------------------------------------- word diff

const WORD_RE = /\s+|[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]|[^\s\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]+/g;

/** Splits text into words and the spaces between them; each CJK character is a word of its own. */
function tokenize(text) {
  return String(text).match(WORD_RE) || [];
}

/**
 * Where `other` differs from `base`, word by word: `other` cut into segments
 * [{text, changed}], `changed` marking words outside the longest common subsequence.
 * Answers null when the texts are too long to compare in reasonable time.
 */
function diffWords(base, other) {
  const a = tokenize(base).filter((w) => !/^\s/.test(w));
  const tokens = tokenize(other);
  const bIndex = [];
  tokens.forEach((w, i) => {
    if (!/^\s/.test(w)) bIndex.push(i);
  });
  const n = a.length;
  const m = bIndex.length;
  if ((n + 1) * (m + 1) > MAX_DIFF_CELLS) return null;
  // lengths[i][j]: the LCS of a[i..] and b[j..], filled from the end so the walk can go forwards.
  const width = m + 1;
  const lengths = new Uint32Array((n + 1) * width);
  for (let i = n - 1; i >= 0; i -= 1) {
    for (let j = m - 1; j >= 0; j -= 1) {
      lengths[i * width + j] = a[i] === tokens[bIndex[j]]
        ? lengths[(i + 1) * width + j + 1] + 1
        : Math.max(lengths[(i + 1) * width + j], lengths[i * width + j + 1]);
    }
  }
  const common = new Uint8Array(tokens.length);
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i] === tokens[bIndex[j]]) {
      common[bIndex[j]] = 1;
      i += 1;
      j += 1;
    } else if (lengths[(i + 1) * width + j] >= lengths[i * width + j + 1]) {
      i += 1;
    } else {
      j += 1;
    }
  }
  // Neighbouring changed words, with the spaces between them, make one highlight.
  const nextChanged = new Uint8Array(tokens.length + 1);
  for (let k = tokens.length - 1; k >= 0; k -= 1) {
    nextChanged[k] = /^\s/.test(tokens[k]) ? nextChanged[k + 1] : common[k] ? 0 : 1;
  }
  const segments = [];
  tokens.forEach((word, index) => {
    const prev = segments[segments.length - 1];
    const changed = /^\s/.test(word) ? Boolean(prev && prev.changed && nextChanged[index + 1]) : !common[index];
    if (prev && prev.changed === changed) prev.text += word;
    else segments.push({ text: word, changed });
  });
  return segments;
}

/** Shows a cell's answer, plain or with the words that differ from column 1 marked. */
function renderCellText(cell, baseText) {
  const useDiff = els.diff.checked && baseText !== null && cell.done;
  if (!useDiff && cell.tokenNodes) {
    cell.content.replaceChildren(...cell.tokenNodes); // the token spans, with their probabilities
    return;
  }
  if (!useDiff) {
    cell.content.replaceChildren(document.createTextNode(cell.answer));
    cell.answerNode = cell.content.firstChild;
    return;
  }
  const segments = diffWords(baseText, cell.answer);
  if (!segments) {
    cell.content.replaceChildren(document.createTextNode(cell.answer));
    cell.answerNode = cell.content.firstChild;
    cell.content.title = t("compare.diff_too_long");
    return;
  }
  cell.content.replaceChildren(...segments.map((segment) =>
    segment.changed ? makeElement("span", "diff-changed", segment.text) : document.createTextNode(segment.text)));
  cell.answerNode = null;
}

function renderRoundDiff(round) {
  const base = round.cells[0];
  const baseReady = base && base.done;
  round.cells.forEach((cell, index) => {
    if (!cell.done) return;
    renderCellText(cell, index > 0 && baseReady ? base.answer : null);
  });
  round.el.classList.toggle("diffing", els.diff.checked);
}

// ---------------------------------------------------------------- the columns

function slotColumn(slotId) {
  return loadedSlots().findIndex((slot) => slot.id === slotId);
}

/** "shares weights with column 1 (adapter unmerged)", or "" for a slot with weights of its own. */
function sharesNote(slot) {
  if (!slot.shares_weights_with) return "";
  const column = slotColumn(slot.shares_weights_with) + 1;
  const mode = slot.adapter_mode ? t(`compare.mode_${slot.adapter_mode}`) : "";
  return t(mode ? "compare.shares_mode" : "compare.shares", { n: column > 0 ? column : slot.shares_weights_with, mode });
}

function slotTitle(slot) {
  const parts = [slot.model, slot.backend, slot.adapter && `adapter ${slot.adapter} (${slot.adapter_enabled ? "on" : "off"})`];
  return parts.filter(Boolean).join("\n");
}

function renderHead() {
  const slots = loadedSlots();
  els.columns.style.setProperty("--cols", String(Math.max(slots.length, 1)));
  els.head.replaceChildren(...slots.map((slot, index) => {
    const cell = makeElement("div", "compare-col-head");
    cell.dataset.slot = slot.id;
    const label = makeElement("div", "col-label");
    label.append(makeElement("span", "col-number", String(index + 1)), makeElement("span", "col-name", String(slot.label || slot.id)));
    label.title = slotTitle(slot);
    const sub = [slot.backend, slot.adapter && t(slot.adapter_enabled ? "compare.adapter_on" : "compare.adapter_off",
      { name: fileName(slot.adapter) })].filter(Boolean).join(" · ");
    cell.append(label, makeElement("div", "col-sub", sub));
    const note = sharesNote(slot);
    if (note) cell.append(makeElement("div", "col-note", note));
    return cell;
  }));
  els.empty.hidden = slots.length > 0;
  els.head.hidden = slots.length === 0;
}

/** Takes the server's slots as the columns; the rounds so far, asked of the old ones, go. */
function adoptSlots(list) {
  setLoadedSlots(list);
  forgetRounds();
  renderHead();
  renderSummary();
  updateControls();
}

function renderSummary() {
  const count = loadedSlots().length;
  if (count) bind(els.summary, "compare.setup_loaded", { n: count });
  else bind(els.summary, "compare.setup");
}

/** The slot a column's picker describes, reduced to what it generates with. */
function specKey(spec) {
  const catalog = getCatalog();
  const known = catalog.models.find((m) => m.id === spec.model || m.path === spec.model);
  // The server names no adapter for a slot whose adapter is off: to the model it is the base.
  const adapter = spec.adapter && spec.adapter_enabled !== false ? spec.adapter : null;
  return JSON.stringify([known ? known.id : spec.model, adapter]);
}

function pickersMatchSlots() {
  const specs = slotList.specs();
  const slots = loadedSlots();
  return specs.length === slots.length && specs.every((spec, i) => specKey(spec) === specKey(slots[i]));
}

function updateControls() {
  const busy = loading || Boolean(running);
  els.load.disabled = busy || slotList.specs().some((spec) => !spec.model);
  els.unload.disabled = busy || !loadedSlots().length;
  els.add.disabled = busy || slotList.cards.length >= MAX_COLUMNS;
  slotList.setDisabled(busy);
  els.send.disabled = busy || !loadedSlots().length;
  els.prompt.disabled = Boolean(running);
  els.stop.disabled = !running;
  els.clear.disabled = busy || !rounds.length;
  els.stale.hidden = !loadedSlots().length || loading || pickersMatchSlots();
}

function showError(text) {
  els.error.textContent = text || "";
  els.error.hidden = !text;
}

// ---------------------------------------------------------------- loading the slots

let loadTimer = null;

function showLoading(on) {
  clearInterval(loadTimer);
  els.progress.hidden = !on;
  if (!on) return;
  const started = Date.now();
  const tick = () => {
    els.progressText.textContent = t("compare.loading", { s: Math.round((Date.now() - started) / 1000) });
  };
  tick();
  loadTimer = setInterval(tick, 1000);
}

async function loadColumns() {
  if (loading || running) return;
  const specs = slotList.requestSpecs();
  loading = true;
  showError("");
  showLoading(true);
  updateControls();
  try {
    const answer = await requestJson("/api/compare/slots", { method: "POST", body: { slots: specs }, verbatim: true });
    adoptSlots(answer.slots);
    els.setup.open = false; // the columns are what matter now; the pickers fold away
  } catch (err) {
    showError(err.message);
    // A failed load may have replaced the old set or left it: show what the server has now.
    await refreshSlots(false);
  } finally {
    loading = false;
    showLoading(false);
    updateControls();
  }
}

async function unloadColumns() {
  if (loading || running) return;
  loading = true;
  showError("");
  updateControls();
  try {
    const answer = await requestJson("/api/compare/slots", { method: "DELETE", verbatim: true });
    adoptSlots(answer.slots || []);
    els.setup.open = true;
  } catch (err) {
    showError(err.message);
  } finally {
    loading = false;
    updateControls();
  }
}

/** Asks the server which slots it has; with `adoptPickers` the pickers take them over too. */
async function refreshSlots(adoptPickers) {
  try {
    const answer = await requestJson("/api/compare/slots", { verbatim: true });
    const list = Array.isArray(answer.slots) ? answer.slots : [];
    const identity = (all) => JSON.stringify(all.map((s) => [s.id, s.model, s.backend, s.adapter, s.adapter_enabled]));
    const same = identity(list) === identity(loadedSlots());
    if (!same) adoptSlots(list);
    if (adoptPickers && list.length >= MIN_COLUMNS) {
      slotList.setSpecs(list);
      els.setup.open = false;
    }
    return true;
  } catch (err) {
    if (err.status !== 404) showError(err.message);
    return false;
  }
}

/** Two columns to start from: the served model, then another model (its GGUF or checkpoint twin, say). */
function defaultSpecs() {
  const catalog = getCatalog();
  const available = catalog.models.filter((m) => m.available);
  if (!available.length) return [{}, {}];
  const status = lastStatus();
  const first = available.find((m) => status && m.path === status.model) || available[0];
  if (status && status.adapter && first.backend !== "llamacpp") {
    return [{ model: first.id, adapter: status.adapter, adapter_enabled: true },
            { model: first.id, adapter: status.adapter, adapter_enabled: false }];
  }
  const second = available.find((m) => m.id !== first.id) || first;
  return [{ model: first.id }, { model: second.id }];
}

let pickersSeeded = false;

document.addEventListener("mt:catalog", () => {
  if (pickersSeeded || slotList.cards.length) return;
  pickersSeeded = true;
  slotList.setSpecs(defaultSpecs());
});

// ---------------------------------------------------------------- one round

function newCell(slot, column) {
  const el = makeElement("div", "compare-cell");
  el.dataset.slot = slot.id;
  el.dataset.column = String(column + 1);
  const content = makeElement("div", "content");
  const note = makeElement("div", "note");
  note.hidden = true;
  el.append(content, note);
  const cell = { slot, el, content, note, answer: "", done: false, ended: false, id: newRequestId(), generation: null,
                 messages: [], withProbabilities: probabilitiesOn() };
  startCellText(cell, "");
  return cell;
}

/** The cell's answer so far (`start`, a branch's kept text), then what streams in. */
function startCellText(cell, start) {
  cell.answer = start;
  cell.tokenNodes = null;
  cell.content.replaceChildren(document.createTextNode(start));
  cell.answerNode = cell.withProbabilities ? null : cell.content.firstChild;
  cell.view = cell.withProbabilities
    ? tokenView(cell.content, (prefix, alternative) => branchCell(cell, prefix, alternative), start) : null;
}

function setCellNote(cell, key, vars) {
  if (key) bind(cell.note, key, vars);
  else cell.note.textContent = "";
  cell.note.hidden = !key;
}

function appendToCell(cell, text, logprobs = null) {
  if (cell.ended || (!text && !logprobs)) return;
  cell.answer += text || "";
  setCellNote(cell, "");
  if (cell.view) cell.view.add(text, logprobs);
  else if (cell.answerNode && text) cell.answerNode.appendData(text);
}

function finishCell(round, cell, { finishReason, usage, timings, error, toolCalls = [] }) {
  if (cell.ended) return;
  cell.ended = true;
  cell.done = true;
  cell.el.classList.remove("streaming");
  setCellNote(cell, "");
  const calls = error ? [] : toolCalls;
  if (calls.length) cell.el.append(renderToolCalls(calls)); // each column's calls, side by side with the others'
  const figures = makeFigures({ finishReason: error ? null : finishReason, usage, timings });
  if (figures) cell.el.append(figures);
  if (error) cell.el.append(makeElement("div", "cell-error", error));
  if (!cell.answer && !calls.length && !error) cell.el.classList.add("empty");
  cell.result = { finishReason, usage, timings, error, toolCalls: calls };
  if (cell.view) cell.tokenNodes = Array.from(cell.content.childNodes);

  if ((cell.answer || calls.length) && els.multiTurn.checked) {
    const history = histories.get(cell.slot.id) || [];
    const answer = { role: "assistant", content: cell.answer };
    if (calls.length) answer.tool_calls = calls.map(callMessage);
    history.push({ role: "user", content: round.prompt }, answer);
    histories.set(cell.slot.id, history);
    cell.inHistory = true;
  }
  if (round.cells.every((c) => c.done)) {
    running = null;
    renderRoundDiff(round);
    updateControls();
    if (window.matchMedia("(pointer: fine)").matches && document.body.dataset.view === "compare") els.prompt.focus();
  } else if (els.diff.checked) {
    renderRoundDiff(round);
  }
}

function runCell(round, cell, body) {
  cell.generation = streamTurn(body, {
    queue: () => setCellNote(cell, "compare.waiting"),
    token: (text, data) => appendToCell(cell, text, data.logprobs),
    end: (outcome) => finishCell(round, cell, outcome),
  });
}

/** A round's element: the prompt under the user's label; the answers go below it. */
function newRoundEl(className, text) {
  const el = makeElement("div", className);
  const promptEl = makeElement("div", "round-prompt");
  const role = makeElement("span", "role");
  bind(role, "role.user");
  promptEl.append(role, makeElement("span", "content", text));
  el.append(promptEl);
  return el;
}

function send() {
  if (running || loading || !loadedSlots().length) return;
  const text = els.prompt.value;
  if (!text.trim()) return;
  showError("");
  if (els.blind.checked) {
    els.prompt.value = "";
    sendBlind(text);
    return;
  }
  let settings;
  try {
    settings = { ...generationSettings(), ...structuredSettings() };
  } catch (err) { // a JSON box that does not parse: say which, send nothing
    showError(err.message);
    return;
  }
  els.prompt.value = "";

  const el = newRoundEl("compare-round", text);
  const cellsEl = makeElement("div", "round-cells");
  el.append(cellsEl);
  const round = { prompt: text, el, cells: [], stopRequested: false };
  round.cells = loadedSlots().map((slot, column) => newCell(slot, column));
  for (const cell of round.cells) {
    cell.el.classList.add("streaming");
    cellsEl.append(cell.el);
  }
  rounds.push(round);
  els.rounds.append(el);
  el.scrollIntoView({ block: "start" });
  running = round;
  updateControls();

  for (const cell of round.cells) {
    const history = els.multiTurn.checked ? histories.get(cell.slot.id) || [] : [];
    cell.messages = [...history, { role: "user", content: text }];
    cell.round = round;
    runCell(round, cell, cellBody(cell, cell.messages, settings));
  }
}

/** A blind round: the answers come back together, shuffled, the models hidden until the vote. */
function sendBlind(text) {
  const el = newRoundEl("compare-round blind-round", text);
  els.rounds.append(el);
  el.scrollIntoView({ block: "start" });
  running = { cells: [], blind: true };
  updateControls();
  blindRound(el, { prompt: text, ...generationSettings() }).finally(() => {
    running = null;
    updateControls();
  });
}

function cellBody(cell, messages, settings) {
  const body = { messages, request_id: cell.id, slot: cell.slot.id, ...settings };
  if (cell.withProbabilities) body.logprobs = TOP_ALTERNATIVES;
  return body;
}

/**
 * A column's answer branched where the user picked another token: cut there, that token in
 * instead, and the column's model goes on writing from it. Only the latest round can branch,
 * and only between rounds.
 */
function branchCell(cell, prefix, alternative) {
  const round = cell.round;
  if (running || loading || !round || round !== rounds[rounds.length - 1]) return;
  let settings;
  try {
    settings = { ...generationSettings(), ...structuredSettings() };
  } catch (err) {
    showError(err.message);
    return;
  }
  if (cell.inHistory) {
    histories.get(cell.slot.id).splice(-2, 2); // this round's answer is being replaced
    cell.inHistory = false;
  }
  const start = prefix + alternative;
  for (const old of cell.el.querySelectorAll(".figures, .cell-error, .tool-calls")) old.remove();
  cell.el.classList.remove("empty");
  cell.el.classList.add("streaming");
  Object.assign(cell, { ended: false, done: false, id: newRequestId(), generation: null });
  startCellText(cell, start);
  round.stopRequested = false;
  running = round;
  updateControls();
  const body = cellBody(cell, [...cell.messages, { role: "assistant", content: start }], settings);
  runCell(round, cell, { ...body, continue_final: true });
}

function stop() {
  const round = running;
  if (!round || round.stopRequested) return;
  round.stopRequested = true;
  els.stop.disabled = true;
  for (const cell of round.cells) {
    if (!cell.ended && stopWithGrace(cell.generation)) setCellNote(cell, "chat.stopping");
  }
}

/** Drops the rounds on show and the conversations multi-turn would carry on. */
function forgetRounds() {
  rounds = [];
  histories = new Map(loadedSlots().map((slot) => [slot.id, []]));
  els.rounds.replaceChildren();
}

function clearRounds() {
  if (running) return;
  forgetRounds();
  updateControls();
}

// ---------------------------------------------------------------- wiring

els.add.addEventListener("click", () => {
  const specs = slotList.specs();
  slotList.add(specs.length ? { ...specs[specs.length - 1] } : {});
});
els.load.addEventListener("click", loadColumns);
els.unload.addEventListener("click", unloadColumns);
wireComposer(els.composer, els.prompt, send);
els.stop.addEventListener("click", stop);
els.clear.addEventListener("click", clearRounds);
els.diff.addEventListener("change", () => rounds.forEach(renderRoundDiff));
document.addEventListener("mt:lang", () => {
  renderHead();
  renderSummary();
  if (loading) showLoading(true);
});
// Another tab may have loaded slots; look again whenever the view is opened.
document.addEventListener("mt:view", (event) => {
  if (event.detail === "compare" && !loading && !running) refreshSlots(loadedSlots().length === 0);
});

renderHead();
renderSummary();
updateControls();
refreshSlots(true);

export const specs = () => slotList.specs();
export const setSpecs = (wanted) => slotList.setSpecs(wanted);
export { diffWords, tokenize, loadColumns, send, stop };
