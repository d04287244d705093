/* The system panel: the server's memory, CPU and GPU from GET /api/system, a model load's
 * progress from the status model-panel.js polls, and a running evaluation's progress.
 */
import { t } from "./i18n.js";
import { getJson } from "./api.js";
import { byId, fileName, makeElement } from "./dom.js";
import { formatBytes } from "./format.js";

const POLL_MS = 3000;
// A server without /api/system (an older one) is asked again only now and then.
const MISSING_POLL_MS = 30000;

const els = {
  loading: byId("monitor-loading"),
  loadingText: byId("monitor-loading-text"),
  process: byId("mon-process"),
  memory: byId("mon-memory"),
  memoryBar: byId("mon-memory-bar"),
  cpu: byId("mon-cpu"),
  gpus: byId("mon-gpus"),
  evalBox: byId("monitor-eval"),
  evalBar: byId("monitor-eval-bar"),
  evalText: byId("monitor-eval-text"),
  error: byId("monitor-error"),
};

let last = null;
let lastStatus = null;
let failure = null;

const percent = (value) => (typeof value === "number" ? `${value.toFixed(value >= 10 ? 0 : 1)}%` : "—");

function renderLoading() {
  const status = lastStatus;
  const loading = Boolean(status && status.state === "loading");
  els.loading.hidden = !loading;
  if (loading) {
    const seconds = typeof status.load_elapsed_s === "number" ? status.load_elapsed_s.toFixed(0) : "…";
    els.loadingText.textContent = t("monitor.loading", { name: status.model_name || fileName(status.model), s: seconds });
  }
}

function setBar(bar, fraction) {
  const value = Math.max(0, Math.min(1, Number(fraction) || 0));
  bar.style.width = `${(value * 100).toFixed(1)}%`;
  bar.parentElement.classList.toggle("high", value >= 0.9);
}

function renderGpus(gpus, note) {
  if (!Array.isArray(gpus) || !gpus.length) {
    const none = makeElement("dd", "muted", t("monitor.no_gpu"));
    none.title = note || "";
    els.gpus.replaceChildren(makeElement("dt", "", t("monitor.gpu")), none);
    return;
  }
  const rows = [];
  for (const gpu of gpus) {
    const dt = makeElement("dt", "", t("monitor.gpu_n", { n: gpu.index }));
    const dd = makeElement("dd");
    const used = gpu.memory_used_bytes;
    const total = gpu.memory_total_bytes;
    const busy = gpu.utilization_percent != null ? ` · ${t("monitor.gpu_busy", { pct: percent(gpu.utilization_percent) })}` : "";
    const text = makeElement("div", "mon-line", `${formatBytes(used)} / ${formatBytes(total)}${busy}`);
    text.title = String(gpu.name || "");
    const meter = makeElement("div", "meter");
    const bar = makeElement("div", "meter-bar");
    meter.append(bar);
    dd.append(makeElement("div", "mon-sub", String(gpu.name || "")), text, meter);
    setBar(bar, total > 0 ? used / total : 0);
    rows.push(dt, dd);
  }
  els.gpus.replaceChildren(...rows);
}

function renderEval(run) {
  els.evalBox.hidden = !run;
  if (!run) return;
  const total = Number(run.total) || 0;
  const done = Number(run.done) || 0;
  setBar(els.evalBar, total ? done / total : 0);
  els.evalText.textContent = t("monitor.eval", { done, total, state: t(`evalstate.${run.state}`) });
}

function render() {
  renderLoading();
  els.error.hidden = !failure;
  if (failure) els.error.textContent = t("monitor.unavailable", { reason: failure });
  const data = last;
  if (!data) return;
  const proc = data.process || {};
  els.process.textContent = t("monitor.process", {
    rss: formatBytes(proc.rss_bytes), cpu: percent(proc.cpu_percent), threads: proc.threads ?? "—",
  });
  const memory = data.memory || {};
  els.memory.textContent = t("monitor.memory", {
    used: formatBytes(memory.used_bytes), total: formatBytes(memory.total_bytes), pct: percent(memory.percent),
  });
  setBar(els.memoryBar, (memory.percent || 0) / 100);
  const cpu = data.cpu || {};
  const load = Array.isArray(cpu.load_avg) ? cpu.load_avg.map((v) => Number(v).toFixed(2)).join(" ") : null;
  els.cpu.textContent = [
    percent(cpu.percent),
    load && t("monitor.load", { load }),
    cpu.logical_cores && t("monitor.cores", { n: cpu.logical_cores }),
  ].filter(Boolean).join(" · ");
  renderGpus(data.gpus, data.gpu_note);
  renderEval(data.eval);
  document.dispatchEvent(new CustomEvent("mt:system", { detail: data }));
}

/** Fetches the figures once; answers false when the server has no /api/system. */
async function refresh() {
  let found = true;
  try {
    last = await getJson("/api/system");
    failure = null;
  } catch (err) {
    failure = err.message;
    found = err.status !== 404;
  }
  render();
  return found;
}

async function poll() {
  let next = POLL_MS;
  if (!document.hidden && !(await refresh())) next = MISSING_POLL_MS;
  setTimeout(poll, next);
}

document.addEventListener("mt:status", (event) => {
  lastStatus = event.detail;
  renderLoading();
});
document.addEventListener("mt:lang", render);

poll();

export { refresh };
export const lastSnapshot = () => last;
