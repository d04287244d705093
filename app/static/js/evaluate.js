/* Batch evaluation: upload a test set (.jsonl or .csv), run it on one to four models on the
 * server, follow its progress on an EventSource, then read the scores as a table, a chart and
 * row by row, and download them. Earlier runs are listed and reopen; a stopped one resumes.
 */
import { bind, t } from "./i18n.js";
import { apiFetch, describeFailure, openEventStream, requestJson } from "./api.js";
import { byId, downloadBlob, makeButton, makeElement, makeSvg } from "./dom.js";
import { formatDate } from "./format.js";
import { walkEval } from "./arena.js";
import { getCatalog } from "./catalog.js";
import { SlotList, fillModelSelect, selectedModel } from "./picker.js";
import { loadedSlots } from "./compare-slots.js";
import { refresh as refreshMonitor } from "./monitor.js";
import "./lm-eval.js"; // the panel's lm-evaluation-harness commands

const MAX_MODELS = 4;
const ROWS_PAGE = 100; // a test set of thousands of rows would make the page crawl if shown whole
const RESUMABLE = ["cancelled", "interrupted"];
// The chart's bars, each on a 0-100 scale. The reference's perplexity becomes the geometric mean
// probability of its tokens (100 / perplexity), so that a taller bar is better, as for the others.
const METRICS = [
  { key: "bleu", label: "eval.bleu", value: (row) => row.bleu, cls: "bar-bleu" },
  { key: "rouge_l", label: "eval.rouge_l", value: (row) => row.rouge_l * 100, cls: "bar-rouge" },
  { key: "exact_match", label: "eval.exact_match", value: (row) => row.exact_match * 100, cls: "bar-em" },
  { key: "ref_perplexity", label: "eval.ref_p", value: (row) => 100 / row.ref_perplexity, cls: "bar-ref" },
];

const els = {
  form: byId("eval-form"),
  file: byId("eval-file"),
  fileButton: byId("eval-file-button"),
  fileName: byId("eval-file-name"),
  name: byId("eval-name"),
  maxTokens: byId("eval-max-tokens"),
  models: byId("eval-models"),
  modelsHint: byId("eval-models-hint"),
  addModel: byId("eval-add-model"),
  useCompare: byId("eval-use-compare"),
  start: byId("eval-start"),
  error: byId("eval-error"),
  run: byId("eval-run"),
  runTitle: byId("eval-run-title"),
  progress: byId("eval-progress"),
  progressText: byId("eval-progress-text"),
  cancel: byId("eval-cancel"),
  result: byId("eval-result"),
  resultTitle: byId("eval-result-title"),
  resultMeta: byId("eval-result-meta"),
  resultError: byId("eval-result-error"),
  resume: byId("eval-resume"),
  downloadCsv: byId("eval-download-csv"),
  downloadJsonl: byId("eval-download-jsonl"),
  summary: byId("eval-summary"),
  chart: byId("eval-chart"),
  rows: byId("eval-rows"),
  moreRows: byId("eval-more-rows"),
  list: byId("eval-list"),
  listEmpty: byId("eval-list-empty"),
  refresh: byId("eval-refresh"),
  scoreOnly: byId("eval-score-only"),
  vote: byId("eval-vote"),
  blind: byId("eval-blind"),
  judge: byId("eval-judge"),
  judgeMode: byId("eval-judge-mode"),
};

let following = null; // {id, name, total, source}: the run whose progress is on show
let shownEval = null; // the last GET /api/evals/<id> on show
let rowsShown = ROWS_PAGE;
let evals = [];

const modelList = new SlotList(els.models, {
  min: 0,
  max: MAX_MODELS,
  cardKey: "slots.model",
  onChange: () => updateForm(),
});

function showError(text, runningId = null) {
  els.error.replaceChildren();
  els.error.hidden = !text;
  if (!text) return;
  els.error.append(makeElement("span", "", text));
  if (runningId) {
    // 409: another evaluation is running; let the user watch that one instead.
    const show = makeButton("small", "eval.show_running", () => {
      showError("");
      openEval(runningId, true);
    });
    els.error.append(" ", show);
  }
}

function updateForm() {
  const busy = Boolean(following);
  els.start.disabled = busy;
  els.addModel.disabled = modelList.cards.length >= MAX_MODELS;
  els.useCompare.disabled = !loadedSlots().length;
  bind(els.modelsHint, modelList.cards.length ? "eval.models_hint_some" : "eval.models_hint_none");
}

// ---------------------------------------------------------------- formatting

const num = (value, digits) => (typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "—");
const pct = (value) => (typeof value === "number" && Number.isFinite(value) ? `${(value * 100).toFixed(1)}%` : "—");
const ms = (value) => (typeof value === "number" && Number.isFinite(value) ? `${Math.round(value)} ms` : "—");

function stateBadge(state) {
  const badge = makeElement("span", `badge eval-state state-${state}`);
  bind(badge, `evalstate.${state}`);
  return badge;
}

function headerRow(keys) {
  const tr = makeElement("tr");
  for (const key of keys) {
    const th = makeElement("th");
    if (key.startsWith("=")) th.textContent = key.slice(1);
    else bind(th, key);
    th.scope = "col";
    tr.append(th);
  }
  return tr;
}

function cell(text, className) {
  return makeElement("td", className, text);
}

// ---------------------------------------------------------------- following a run

function stopFollowing() {
  if (following && following.source) following.source.close();
  following = null;
  els.run.hidden = true;
  updateForm();
}

function showProgress(done, total, model) {
  els.progress.max = Math.max(1, Number(total) || 0);
  els.progress.value = Math.min(Number(done) || 0, els.progress.max);
  els.progress.dataset.done = String(done);
  els.progress.dataset.total = String(total);
  bind(els.progressText, model ? "eval.progress_model" : "eval.progress", { done, total, model: model || "" });
}

/** Watches a running evaluation on its event stream until it ends, then shows its result. */
function follow(info) {
  stopFollowing();
  const id = info.id;
  const events = info.events || `/api/evals/${encodeURIComponent(id)}/events`;
  following = { id, name: info.name, total: info.total, source: null };
  els.run.hidden = false;
  els.cancel.disabled = false;
  els.runTitle.textContent = info.name || id;
  showProgress(info.done || 0, info.total || 0, null);
  updateForm();

  following.source = openEventStream(events, {
    events: {
      progress: (data) => {
        showProgress(data.done, data.total, data.model);
        const listed = evals.find((run) => run.id === id);
        if (listed && listed.done !== data.done) {
          Object.assign(listed, { done: data.done, total: data.total, state: "running" });
          renderList();
        }
      },
    },
    done: (data) => finishFollowing(id, data.state, data.error),
    error: (message) => finishFollowing(id, "error", message),
    lost: () => finishFollowing(id, null, t("eval.lost")),
    reconnects: true, // the server repeats the current progress to a new connection
  });
}

async function finishFollowing(id, state, error) {
  if (!following || following.id !== id) return;
  if (following.source) following.source.close();
  if (state === "done") showProgress(els.progress.max, els.progress.max, null);
  els.cancel.disabled = true;
  following = null;
  updateForm();
  await openEval(id, false);
  if (error && (!shownEval || !shownEval.error)) showResultError(error);
  els.run.hidden = true;
  refreshList();
  refreshMonitor(); // its progress bar would otherwise show the run as running until the next poll
}

async function start() {
  if (following) return;
  showError("");
  const file = els.file.files[0];
  if (!file) {
    showError(t("eval.no_file"));
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const specs = modelList.requestSpecs();
  if (specs.length) form.append("models", JSON.stringify(specs));
  const maxTokens = Number(els.maxTokens.value);
  if (els.maxTokens.value !== "" && Number.isFinite(maxTokens)) form.append("max_new_tokens", String(Math.round(maxTokens)));
  if (els.name.value.trim()) form.append("name", els.name.value.trim());
  if (els.scoreOnly.checked) form.append("score_only", "true");
  const judge = judgeSpec();
  if (judge) form.append("judge", JSON.stringify(judge));

  els.start.disabled = true;
  try {
    const info = await requestJson("/api/eval", { method: "POST", form, verbatim: true });
    follow(info);
    refreshList();
  } catch (err) {
    showError(err.message, err.body && err.body.running);
    updateForm();
  }
}

async function cancel() {
  if (!following) return;
  els.cancel.disabled = true;
  try {
    await requestJson(`/api/evals/${encodeURIComponent(following.id)}/cancel`, { method: "POST", verbatim: true });
    // the event stream's "done" (state cancelled) ends the run on the page
  } catch (err) {
    els.cancel.disabled = false;
    showError(err.message);
  }
}

async function resume(id) {
  showError("");
  try {
    const info = await requestJson(`/api/evals/${encodeURIComponent(id)}/resume`, { method: "POST", verbatim: true });
    follow(info);
    refreshList();
  } catch (err) {
    showError(err.message, err.body && err.body.running);
  }
}

// ---------------------------------------------------------------- one result

function showResultError(text) {
  els.resultError.textContent = text || "";
  els.resultError.hidden = !text;
}

/** Opens an evaluation; a running one is followed live when `followRunning`. */
async function openEval(id, followRunning) {
  let data;
  try {
    data = await requestJson(`/api/evals/${encodeURIComponent(id)}`, { verbatim: true });
  } catch (err) {
    showError(err.message);
    return;
  }
  renderResult(data);
  if (followRunning && data.state === "running" && !(following && following.id === id)) follow(data);
  else revealResult();
}

function renderResult(data) {
  shownEval = data;
  rowsShown = ROWS_PAGE;
  els.result.hidden = false;
  els.resultTitle.textContent = data.name || data.id;
  const meta = [formatDate(data.created), t("eval.rows_done", { done: data.done ?? 0, total: data.total ?? 0 })].filter(Boolean);
  els.resultMeta.replaceChildren(stateBadge(data.state), ` ${meta.join(" · ")}`);
  showResultError(data.error || "");
  els.resume.hidden = !RESUMABLE.includes(data.state);
  renderSummary(data);
  renderChart(data.summary || []);
  renderRows(data);
  highlightList();
}

function revealResult() {
  els.result.scrollIntoView({ block: "start", behavior: "smooth" });
}

// Rates a summary has only where rows asked for them (a schema, an expected tool call): a column each, shown when some model has one.
const STRUCTURE_RATES = [
  ["valid_json_rate", "eval.valid_json"],
  ["schema_valid_rate", "eval.schema_valid"],
  ["tool_name_accuracy", "eval.tool_name"],
  ["tool_arguments_exact_match", "eval.tool_arguments"],
];

function renderSummary(data) {
  const head = makeElement("thead");
  const judged = Boolean(data.judge);
  const rates = STRUCTURE_RATES.filter(([key]) => (data.summary || []).some((row) => typeof row[key] === "number"));
  head.append(headerRow(["eval.model", "eval.rows", "eval.bleu", "eval.rouge_l", "eval.exact_match", "eval.ref_nll", "eval.ref_ppl",
    ...rates.map(([, label]) => label), ...(judged ? ["eval.judge_record", "eval.judge_rating"] : []), "eval.latency", "eval.tps"]));
  const body = makeElement("tbody");
  for (const row of data.summary || []) {
    const tr = makeElement("tr");
    const name = cell(String(row.label), "wrap");
    const model = (data.models || []).find((m) => m.label === row.label);
    if (model) name.title = [model.model, model.backend, model.adapter && `${model.adapter} (${model.adapter_enabled ? "on" : "off"})`].filter(Boolean).join("\n");
    tr.append(name, cell(String(row.rows ?? "—"), "num"), cell(num(row.bleu, 1), "num"), cell(num(row.rouge_l, 3), "num"),
      cell(pct(row.exact_match), "num"), cell(num(row.ref_nll, 2), "num"), cell(num(row.ref_perplexity, 2), "num"));
    for (const [key] of rates) tr.append(cell(pct(row[key]), "num"));
    if (judged) {
      const record = cell(t("eval.judge_wlt", { w: row.judge_wins ?? 0, l: row.judge_losses ?? 0, t: row.judge_ties ?? 0 }), "num");
      record.title = t("eval.judge_record_title", { unparsable: row.judge_unparsable ?? 0, errors: row.judge_errors ?? 0 });
      tr.append(record, cell(num(row.judge_rating, 1), "num"));
    }
    tr.append(cell(ms(row.latency_ms), "num"), cell(num(row.tokens_per_second, 1), "num"));
    body.append(tr);
  }
  els.summary.replaceChildren(head, body);
}

/** Shortens a label in the middle: model names differ at their ends ("…-q4_1", "…-instruct"). */
function middleEllipsis(text, max) {
  if (text.length <= max) return text;
  const head = Math.ceil((max - 1) / 2);
  return `${text.slice(0, head)}…${text.slice(text.length - (max - 1 - head))}`;
}

/** Grouped bars, one group per model: BLEU (0–100), ROUGE-L and exact match (as %). */
function renderChart(summary) {
  els.chart.replaceChildren();
  if (!summary.length) return;
  const barW = 24;
  const groupGap = 44;
  const groupW = METRICS.length * barW;
  const left = 34;
  const top = 34;
  const plotH = 140;
  const legendW = METRICS.reduce((sum, metric) => sum + 28 + t(metric.label).length * 7, left);
  const width = Math.max(320, legendW, left + 12 + summary.length * (groupW + groupGap));
  const height = top + plotH + 30;
  const root = makeSvg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart" });
  root.append(makeSvg("title", {}, t("eval.chart_title")));
  root.style.maxWidth = `${width}px`; // drawn at its own size; it only ever shrinks to fit

  let x = left;
  for (const metric of METRICS) {
    root.append(makeSvg("rect", { x, y: 8, width: 10, height: 10, rx: 2, class: metric.cls }));
    root.append(makeSvg("text", { x: x + 14, y: 17, class: "chart-legend" }, t(metric.label)));
    x += 14 + t(metric.label).length * 7 + 14;
  }
  for (const tick of [0, 25, 50, 75, 100]) {
    const y = top + plotH - (tick / 100) * plotH;
    root.append(makeSvg("line", { x1: left, x2: width - 4, y1: y, y2: y, class: "chart-grid" }));
    root.append(makeSvg("text", { x: left - 6, y: y + 3, class: "chart-axis", "text-anchor": "end" }, String(tick)));
  }
  const maxChars = Math.floor((groupW + groupGap - 6) / 6.2);
  summary.forEach((row, g) => {
    const gx = left + 12 + g * (groupW + groupGap);
    METRICS.forEach((metric, i) => {
      const raw = typeof row[metric.key] === "number" ? metric.value(row) : NaN;
      const value = Number.isFinite(raw) ? Math.max(0, Math.min(100, raw)) : 0;
      const h = (value / 100) * plotH;
      const bar = makeSvg("rect", { x: gx + i * barW, y: top + plotH - h, width: barW - 4, height: Math.max(h, 0.5), class: metric.cls });
      bar.append(makeSvg("title", {}, `${row.label} · ${t(metric.label)}: ${value.toFixed(1)}`));
      root.append(bar);
      root.append(makeSvg("text", { x: gx + i * barW + (barW - 4) / 2, y: top + plotH - h - 3, class: "chart-value", "text-anchor": "middle" },
        value.toFixed(0)));
    });
    const name = String(row.label);
    const label = makeSvg("text", { x: gx + (groupW - 4) / 2, y: top + plotH + 16, class: "chart-label", "text-anchor": "middle" },
      middleEllipsis(name, maxChars));
    label.append(makeSvg("title", {}, name));
    root.append(label);
  });
  els.chart.append(root);
}

/** The judge's verdicts that concern one model's answer on a row, as short lines with the reasons on hover. */
function judgeNotes(row, label) {
  const notes = [];
  for (const verdict of row.judge || []) {
    if (verdict.kind === "single" && verdict.model === label) {
      notes.push({ text: t("eval.judge_grade", { v: verdict.verdict }), reason: verdict.reason });
    } else if (verdict.kind === "pairwise" && (verdict.model_a === label || verdict.model_b === label)) {
      const other = verdict.model_a === label ? verdict.model_b : verdict.model_a;
      const outcome = verdict.verdict === label ? "win" : verdict.verdict === other ? "loss" : verdict.verdict || "pending";
      notes.push({ text: t("eval.judge_vs", { other, outcome: t(`judge.${outcome}`) }),
                   reason: [verdict.reason_ab, verdict.reason_ba].filter(Boolean).join("\n———\n") });
    }
  }
  return notes;
}

function outputCell(output, notes = []) {
  const td = makeElement("td", "output");
  if (!output) {
    td.textContent = "—";
    return td;
  }
  td.append(makeElement("div", "cell-text", String(output.output ?? "")));
  for (const call of output.tool_calls || []) {
    td.append(makeElement("div", "cell-call", `${call.name}(${call.arguments})`));
  }
  const exact = output.exact_match === true || output.exact_match === 1;
  const scored = output.finish_reason === "scored"; // a score-only eval: no answer, only the reference's likelihood
  const scores = [
    scored ? null : `BLEU ${num(output.bleu, 1)}`,
    scored ? null : `R-L ${num(output.rouge_l, 2)}`,
    scored ? null : exact ? "EM ✓" : "EM ✗",
    typeof output.schema_valid === "number" ? t(output.schema_valid ? "eval.cell_schema_ok" : "eval.cell_schema_bad") : null,
    typeof output.tool_arguments_match === "number"
      ? t(output.tool_arguments_match ? "eval.cell_call_ok" : output.tool_name_match ? "eval.cell_call_args" : "eval.cell_call_bad") : null,
    typeof output.ref_nll === "number" ? `NLL ${num(output.ref_nll, 2)} · PPL ${num(output.ref_perplexity, 2)}` : null,
    scored ? null : ms(output.latency_ms),
    output.finish_reason && output.finish_reason !== "stop" ? output.finish_reason : null,
  ].filter(Boolean);
  td.append(makeElement("div", "cell-scores", scores.join(" · ")));
  for (const note of notes) {
    const line = makeElement("div", "cell-judge", note.text);
    line.title = note.reason || "";
    td.append(line);
  }
  if (exact) td.classList.add("exact");
  return td;
}

function renderRows(data) {
  const labels = (data.models || []).map((m) => m.label);
  const rows = data.rows || [];
  const head = makeElement("thead");
  head.append(headerRow(["=#", "eval.prompt", "eval.reference", ...labels.map((label) => `=${label}`)]));
  const body = makeElement("tbody");
  for (const row of rows.slice(0, rowsShown)) {
    const tr = makeElement("tr");
    const prompt = makeElement("td", "prompt");
    if (row.system) prompt.append(makeElement("div", "cell-system", String(row.system)));
    prompt.append(makeElement("div", "cell-text", String(row.prompt ?? "")));
    tr.append(cell(String((row.index ?? 0) + 1), "num"), prompt, makeElement("td", "reference", row.reference == null ? "—" : String(row.reference)));
    for (const label of labels) tr.append(outputCell(row.outputs ? row.outputs[label] : null, judgeNotes(row, label)));
    body.append(tr);
  }
  els.rows.replaceChildren(head, body);
  els.moreRows.hidden = rows.length <= rowsShown;
  if (!els.moreRows.hidden) bind(els.moreRows, "eval.more_rows", { n: rows.length - rowsShown });
}

/** Fetches a result file with the page's credentials and saves it under the server's name for it. */
async function download(format) {
  if (!shownEval) return;
  const url = `/api/evals/${encodeURIComponent(shownEval.id)}/download?format=${format}`;
  try {
    const response = await apiFetch(url);
    if (!response.ok) throw new Error(await describeFailure(response));
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
    const name = match ? decodeURIComponent(match[1]) : `${shownEval.name || shownEval.id}.${format}`;
    downloadBlob(await response.blob(), name);
  } catch (err) {
    showResultError(t("eval.download_failed", { reason: err.message }));
  }
}

// ---------------------------------------------------------------- earlier runs

function highlightList() {
  for (const item of els.list.children) item.classList.toggle("current", Boolean(shownEval && item.dataset.id === shownEval.id));
}

function renderList() {
  els.list.replaceChildren(...evals.map((run) => {
    const item = makeElement("li", "eval-item");
    item.dataset.id = run.id;
    const open = makeElement("button", "eval-open");
    open.type = "button";
    const title = makeElement("span", "eval-item-title", run.name || run.id);
    const meta = makeElement("span", "eval-item-meta",
      [formatDate(run.created), t("eval.rows_done", { done: run.done ?? 0, total: run.total ?? 0 }),
       Array.isArray(run.models) ? run.models.join(", ") : ""].filter(Boolean).join(" · "));
    open.append(title, stateBadge(run.state), meta);
    open.addEventListener("click", () => openEval(run.id, true));
    item.append(open);
    if (RESUMABLE.includes(run.state)) item.append(makeButton("small eval-item-resume", "eval.resume", () => resume(run.id)));
    return item;
  }));
  els.listEmpty.hidden = evals.length > 0;
  highlightList();
}

async function refreshList() {
  try {
    const answer = await requestJson("/api/evals", { verbatim: true });
    evals = Array.isArray(answer.evals) ? answer.evals : [];
    renderList();
    return evals;
  } catch (err) {
    if (err.status !== 404) showError(err.message);
    return [];
  }
}

els.vote.addEventListener("click", () => {
  if (shownEval) walkEval(els.blind, shownEval);
});

// ---------------------------------------------------------------- the judge

/** The judge's select: none, the operator's endpoint, or any model on offer. */
function renderJudgeChoices() {
  const keep = els.judge.value;
  const none = makeElement("option", "", t("eval.judge_none"));
  none.value = "";
  const endpoint = makeElement("option", "", t("eval.judge_endpoint"));
  endpoint.value = "@endpoint";
  const filled = fillModelSelect(els.judge, getCatalog());
  els.judge.prepend(none, endpoint);
  if (!filled) els.judge.replaceChildren(none, endpoint);
  els.judge.value = Array.from(els.judge.options).some((o) => o.value === keep) ? keep : "";
  els.judgeMode.disabled = !els.judge.value;
}

function judgeSpec() {
  const value = els.judge.value;
  if (!value) return null;
  if (value === "@endpoint") return { endpoint: true, mode: els.judgeMode.value };
  const model = selectedModel(els.judge);
  return { model: model ? model.id : value, backend: model ? model.backend : undefined, mode: els.judgeMode.value };
}

els.judge.addEventListener("change", () => {
  els.judgeMode.disabled = !els.judge.value;
});
document.addEventListener("mt:catalog", renderJudgeChoices);
document.addEventListener("mt:lang", renderJudgeChoices);

// ---------------------------------------------------------------- wiring

// The browser's own file button speaks the browser's language; this one follows the page's.
els.fileButton.addEventListener("click", () => els.file.click());
els.file.addEventListener("change", () => {
  const file = els.file.files[0];
  if (file) {
    els.fileName.removeAttribute("data-i18n");
    els.fileName.textContent = file.name;
  } else {
    bind(els.fileName, "eval.no_file_chosen");
  }
});
els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
els.addModel.addEventListener("click", () => {
  const specs = modelList.specs();
  modelList.add(specs.length ? { ...specs[specs.length - 1] } : {});
});
els.useCompare.addEventListener("click", () => {
  const slots = loadedSlots();
  if (slots.length) modelList.setSpecs(slots);
});
els.cancel.addEventListener("click", cancel);
els.resume.addEventListener("click", () => shownEval && resume(shownEval.id));
els.downloadCsv.addEventListener("click", () => download("csv"));
els.downloadJsonl.addEventListener("click", () => download("jsonl"));
els.moreRows.addEventListener("click", () => {
  rowsShown += ROWS_PAGE * 5;
  if (shownEval) renderRows(shownEval);
});
els.refresh.addEventListener("click", refreshList);
document.addEventListener("mt:lang", () => {
  renderList();
  if (shownEval) renderResult(shownEval);
  updateForm();
});
// A run started elsewhere (another tab, the API) shows up here too.
document.addEventListener("mt:system", (event) => {
  const run = event.detail && event.detail.eval;
  if (run && run.state === "running" && !following && document.body.dataset.view === "evaluate") {
    openEval(run.id, true);
    refreshList();
  }
});
document.addEventListener("mt:view", (event) => {
  if (event.detail !== "evaluate") return;
  updateForm();
  refreshList().then((list) => {
    const running = list.find((run) => run.state === "running");
    if (running && !following) openEval(running.id, true);
  });
});

updateForm();

export { start, cancel, resume, openEval, refreshList };
export const shown = () => shownEval;
