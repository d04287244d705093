/* Talking to the server: JSON calls with the optional API key, and generation event streams. */
import { t } from "./i18n.js";

/** A failed API call: `message` is the server's own error text where it sent one. */
export class ApiError extends Error {
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

export async function describeFailure(response) {
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

export async function apiFetch(url, options = {}) {
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
export async function requestJson(url, { method = "GET", body, signal, verbatim = false, form } = {}) {
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

export const getJson = (url, options = {}) => requestJson(url, options);
export const postJson = (url, body, signal) => requestJson(url, { method: "POST", body, signal });

export function newRequestId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID().replace(/-/g, "");
  // randomUUID needs a secure context; a tester on http://<lan-ip> does not have one.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function requestStop(requestId) {
  postJson("/api/stop", { request_id: requestId }).catch(() => {
    // the caller's stop grace timer ends the turn whatever happened here
  });
}

export function parseEventData(event) {
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
export function openGenerationStream(url, handlers) {
  const source = new EventSource(url);
  source.addEventListener("queue", (event) => handlers.queue && handlers.queue(parseEventData(event)));
  source.addEventListener("token", (event) => {
    const data = parseEventData(event);
    handlers.token(data.text, data); // data.logprobs when they were asked for
  });
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

