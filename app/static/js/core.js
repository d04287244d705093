/* Shared helpers for the page's modules: building elements, talking to the API, numbers.
 *
 * Everything the model or the server says goes into the page as text nodes, never as HTML:
 * a fine-tune under test may well emit markup.
 */
(() => {
  "use strict";

  const MT = (window.MT = window.MT || {});
  const { t } = MT.i18n;

  // ---------------------------------------------------------------- elements

  function makeElement(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) el.textContent = text;
    return el;
  }

  function makeButton(className, key, onClick) {
    const button = makeElement("button", className);
    button.type = "button";
    if (key) MT.i18n.bind(button, key);
    if (onClick) button.addEventListener("click", onClick);
    return button;
  }

  function fileName(path) {
    if (!path) return "—";
    return String(path).split(/[\\/]/).pop();
  }

  /** Saves a Blob as a download; the object URL lives until the browser has taken the file. */
  function downloadBlob(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = makeElement("a");
    link.href = url;
    link.download = name;
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // ---------------------------------------------------------------- numbers

  function formatSize(bytes) {
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
  function formatBytes(bytes) {
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

  function formatDate(value) {
    const date = typeof value === "number" ? new Date(value * (value < 1e12 ? 1000 : 1)) : new Date(value);
    if (Number.isNaN(date.getTime())) return "";
    return date.toLocaleString(MT.i18n.lang() === "zh" ? "zh-CN" : undefined, {
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

  function formatFigures(data) {
    return figureParts(data).join(" · ");
  }

  /** A figures element that re-renders itself in the new language. */
  function makeFigures(data) {
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

  // ---------------------------------------------------------------- talking to the server

  /** A failed API call: `message` is the server's own error text where it sent one. */
  class ApiError extends Error {
    constructor(message, { status = null, body = null } = {}) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function readFailure(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      // not JSON (a proxy's HTML page, say): the status line is all there is
    }
    return body;
  }

  /** Turns a failed response into one readable line, using the server's JSON error when there is one. */
  function failureText(response, body, verbatim = false) {
    if (body && typeof body.error === "string") {
      if (verbatim) return body.error;
      const where = [body.type, body.field && `field ${body.field}`].filter(Boolean).join(", ");
      return `${body.error}${where ? ` (${where})` : ""}`;
    }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  async function describeFailure(response) {
    return failureText(response, await readFailure(response));
  }

  async function failure(response, verbatim = false) {
    const body = await readFailure(response);
    return new ApiError(failureText(response, body, verbatim), { status: response.status, body });
  }

  // A server started with --api-key answers 401 to the API. The page asks once and keeps the
  // key for this tab only (sessionStorage), sending it as a Bearer token on every API call.
  // EventSource cannot send headers; its stream URL is itself the credential.
  const API_KEY_STORAGE = "model_test.api_key";
  let keyPrompt = null;
  let keyDeclined = false;

  function withApiKey(headers) {
    const key = sessionStorage.getItem(API_KEY_STORAGE);
    return key ? { ...(headers || {}), Authorization: `Bearer ${key}` } : headers || {};
  }

  function askForApiKey() {
    // One prompt at a time: every request that met the 401 meanwhile waits for the same answer.
    if (!keyPrompt) {
      const refused = Boolean(sessionStorage.getItem(API_KEY_STORAGE));
      keyPrompt = new Promise((resolve) => {
        const key = window.prompt(refused ? t("key.refused") : t("key.ask"));
        if (key && key.trim()) {
          sessionStorage.setItem(API_KEY_STORAGE, key.trim());
          resolve(true);
        } else {
          keyDeclined = true; // asking again every poll would trap the user in dialogs
          resolve(false);
        }
      }).finally(() => {
        keyPrompt = null;
      });
    }
    return keyPrompt;
  }

  async function apiFetch(url, options = {}) {
    const send = () => fetch(url, { ...options, headers: withApiKey(options.headers) });
    const keyUsed = sessionStorage.getItem(API_KEY_STORAGE);
    const response = await send();
    if (response.status !== 401 || keyDeclined) return response;
    // A request that left before the key was entered just goes again with it.
    if (sessionStorage.getItem(API_KEY_STORAGE) !== keyUsed) return send();
    return (await askForApiKey()) ? send() : response;
  }

  /**
   * One JSON API call. Rejects with an ApiError carrying the server's message; `verbatim`
   * leaves that message exactly as the server wrote it.
   */
  async function requestJson(url, { method = "GET", body, signal, verbatim = false, form } = {}) {
    const options = { method, signal, cache: "no-store" };
    if (form) {
      options.body = form; // the browser writes the multipart boundary itself
    } else if (body !== undefined) {
      options.headers = { "Content-Type": "application/json" };
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await apiFetch(url, options);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(t("err.unreachable", { reason: err.message }));
    }
    if (!response.ok) throw await failure(response, verbatim);
    return response.json();
  }

  const getJson = (url, options = {}) => requestJson(url, options);
  const postJson = (url, body, signal) => requestJson(url, { method: "POST", body, signal });

  function newRequestId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID().replace(/-/g, "");
    // randomUUID needs a secure context; a tester on http://<lan-ip> does not have one.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function requestStop(requestId) {
    postJson("/api/stop", { request_id: requestId }).catch(() => {
      // the caller's stop grace timer ends the turn whatever happened here
    });
  }

  function parseEventData(event) {
    try {
      return JSON.parse(event.data);
    } catch (_) {
      return {};
    }
  }

  /**
   * Opens one generation's event stream and hands its events to `handlers`
   * ({queue, token, done, error(message), lost()}). The server's own "event: error" and a
   * dropped connection arrive on the same listener; only the former carries data.
   */
  function openGenerationStream(url, handlers) {
    const source = new EventSource(url);
    source.addEventListener("queue", (event) => handlers.queue && handlers.queue(parseEventData(event)));
    source.addEventListener("token", (event) => handlers.token(parseEventData(event).text));
    source.addEventListener("done", (event) => {
      source.close();
      handlers.done(parseEventData(event));
    });
    source.addEventListener("error", (event) => {
      source.close();
      if (typeof event.data === "string") {
        const data = parseEventData(event);
        const where = data.type ? ` (${data.type})` : "";
        handlers.error(`${data.error || t("err.generation_failed")}${where}`);
      } else {
        handlers.lost();
      }
    });
    return source;
  }

  MT.core = {
    makeElement,
    makeButton,
    fileName,
    downloadBlob,
    formatSize,
    formatBytes,
    formatDate,
    formatFigures,
    makeFigures,
    ApiError,
    describeFailure,
    apiFetch,
    requestJson,
    getJson,
    postJson,
    newRequestId,
    requestStop,
    parseEventData,
    openGenerationStream,
  };
})();
