/* Talking to the server: JSON calls with the optional API key, event streams, and one generation
 * from its request to its end, Stop included.
 */
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

/** Whether this tab holds an API key for the server (it was asked for one). */
export function hasApiKey() {
  return Boolean(sessionStorage.getItem(API_KEY_STORAGE));
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

function requestStop(generation) {
  postJson("/api/stop", { request_id: generation.id, stop_token: generation.stopToken }).catch(() => {
    // the stop grace timer ends the turn whatever happened here
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
 * Opens a server event stream: each event named in `events` has its parsed data handed to its
 * handler; "done" closes the stream and goes to `done(data)`. The server's own "event: error"
 * and a dropped connection arrive on the same listener; only the former carries data, and goes
 * to `error(message)`, the latter to `lost()`. A stream that repeats its state to a new
 * connection (an eval's progress) passes `reconnects`: the browser then reconnects by itself
 * and `lost()` comes only once it has given up.
 */
export function openEventStream(url, { events = {}, done, error, lost, reconnects = false }) {
  const source = new EventSource(url);
  for (const [name, handle] of Object.entries(events)) {
    source.addEventListener(name, (event) => handle(parseEventData(event)));
  }
  source.addEventListener("done", (event) => {
    source.close();
    done(parseEventData(event));
  });
  source.addEventListener("error", (event) => {
    if (typeof event.data === "string") {
      source.close();
      const data = parseEventData(event);
      const where = data.type ? ` (${data.type})` : "";
      error(`${data.error || t("err.generation_failed")}${where}`);
    } else if (!reconnects || source.readyState === EventSource.CLOSED) {
      source.close();
      lost();
    }
  });
  return source;
}

// ---------------------------------------------------------------- one generation, and Stop

// After Stop the server answers with a "done" (finish_reason "cancelled"); if that never
// comes, the page ends the turn itself rather than leave the user locked out.
const STOP_GRACE_MS = 2000;

/**
 * One generation the page asked for, named by its request id, and ended exactly once: by its
 * answer, by a failure of any kind, or by Stop's grace running out. `end` hears {finishReason,
 * usage, timings, error, toolCalls} (the calls the answer made, with what is wrong with each,
 * when tools were offered). A streamed one gets its stop token from the server when it is
 * prepared (only the client that started a generation can stop it); one asked whole has none
 * and is stopped by hanging up, which the server notices.
 */
class Generation {
  constructor(requestId, end) {
    this.id = requestId;
    this.stopToken = null;
    this.streamed = false;
    this.end = end;
    this.stopping = false;
    this.ended = false;
    this.source = null;
    this.abort = new AbortController();
    this.graceTimer = null;
  }

  finish({ finishReason, usage = null, timings = null, error = null, toolCalls = [] }) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.graceTimer);
    if (this.source) this.source.close();
    this.end({ finishReason, usage, timings, error, toolCalls });
  }

  answered(data) {
    this.finish({ finishReason: data.finish_reason, usage: data.usage, timings: data.timings, toolCalls: data.tool_calls || [] });
  }

  failed(err) {
    if (err.name === "AbortError") this.finish({ finishReason: "cancelled" });
    else this.finish({ finishReason: "error", error: err.message });
  }
}

/**
 * Streams one generation: POST /api/streams prepares it from `body` (which carries its
 * request_id), then its event stream brings it in. `queue(data)` hears its place in the queue,
 * `token(text, data)` each piece (data.logprobs when they were asked for), and `end(outcome)`
 * its end, whatever ended it: the one place a refused request, the server's error event and a
 * lost connection arrive, as `outcome.error`. Answers the generation, for stopWithGrace.
 */
export function streamTurn(body, { queue = () => {}, token, end }) {
  const generation = new Generation(body.request_id, end);
  generation.streamed = true;
  postJson("/api/streams", body)
    .then((created) => {
      generation.id = created.request_id; // Stop names the generation; the stream URL is its own capability
      generation.stopToken = created.stop_token;
      if (generation.stopping) {
        // Stop was pressed before the stream existed: drop the parked request unopened.
        requestStop(generation);
        generation.finish({ finishReason: "cancelled" });
        return;
      }
      generation.source = openEventStream(created.url, {
        events: { queue, token: (data) => token(data.text, data) },
        done: (data) => generation.answered(data),
        error: (message) => generation.finish({ finishReason: "error", error: message }),
        lost: () => generation.finish(generation.stopping
          ? { finishReason: "cancelled" } : { finishReason: "error", error: t("err.lost") }),
      });
    })
    .catch((err) => generation.failed(err));
  return generation;
}

/** One generation asked whole (POST /api/chat): its text goes to `token` at once, then `end` as for streamTurn. */
export function askWhole(body, { token, end }) {
  const generation = new Generation(body.request_id, end);
  postJson("/api/chat", body, generation.abort.signal)
    .then((result) => {
      if (generation.ended) return;
      token(result.response, result);
      generation.answered(result);
    })
    .catch((err) => generation.failed(err));
  return generation;
}

/**
 * Stop: asks the server to end `generation` with its stop token, and it then ends on its own
 * "done"; a stream not prepared yet is stopped as soon as it is (streamTurn). An answer asked
 * whole is stopped by dropping its request: the server notices the hang-up and stops too. If
 * no ending has come within STOP_GRACE_MS, the generation is ended here as cancelled (its
 * stream closed, its request dropped). Answers false for a generation already stopping or over.
 */
export function stopWithGrace(generation) {
  if (generation.stopping || generation.ended) return false;
  generation.stopping = true;
  if (generation.stopToken) requestStop(generation);
  else if (!generation.streamed) generation.abort.abort();
  generation.graceTimer = setTimeout(() => {
    generation.abort.abort();
    generation.finish({ finishReason: "cancelled" });
  }, STOP_GRACE_MS);
  return true;
}
