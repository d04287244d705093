/* Numbers, sizes, dates and an answer's figures line, in the page's language. */
import { lang, t } from "./i18n.js";
import { makeElement } from "./dom.js";

export function formatSize(bytes) {
  if (typeof bytes !== "number" || !(bytes > 0)) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value >= 10 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

/** Memory in binary units, as system monitors show it (a 16 GiB machine reads "16.0 GiB"). */
export function formatBytes(bytes) {
  if (typeof bytes !== "number" || !(bytes >= 0)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function formatDate(value) {
  const date = typeof value === "number" ? new Date(value * (value < 1e12 ? 1000 : 1)) : new Date(value);
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleString(lang() === "zh" ? "zh-CN" : undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
  });
}

/** The figures line under an answer, as localised parts: "12 tokens · TTFT 80 ms · 95.1 tokens/s". */
function figureParts({ finishReason, usage, timings }) {
  const parts = [];
  if (usage) parts.push(t("fig.tokens", { n: usage.completion_tokens }));
  // With no token there is no first-token time, and a speed needs at least two tokens.
  const produced = !usage || usage.completion_tokens > 0;
  if (timings && produced) {
    parts.push(t("fig.ttft", { ms: Math.round(timings.ttft_ms) }));
    if (timings.tokens_per_second > 0) parts.push(t("fig.speed", { tps: Number(timings.tokens_per_second).toFixed(1) }));
    if (timings.queue_ms >= 100) parts.push(t("fig.queued", { ms: Math.round(timings.queue_ms) }));
  }
  if (finishReason && finishReason !== "stop") parts.push(finishReason);
  return parts;
}

export function formatFigures(data) {
  return figureParts(data).join(" · ");
}

/** A figures element that re-renders itself in the new language. */
export function makeFigures(data) {
  const text = formatFigures(data);
  if (!text) return null;
  const el = makeElement("div", "figures", text);
  el.dataset.figures = JSON.stringify(data);
  return el;
}

document.addEventListener("mt:lang", () => {
  for (const el of document.querySelectorAll("[data-figures]")) {
    try {
      el.textContent = formatFigures(JSON.parse(el.dataset.figures));
    } catch (_) {
      // a figures line that cannot be re-read keeps its old language
    }
  }
});

