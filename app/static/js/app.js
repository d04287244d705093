/* model_test page: chat with the loaded model while its tokens stream in.
 *
 * Everything the model or the server says goes into the page as text nodes, never as HTML:
 * a fine-tune under test may well emit markup.
 */
(() => {
  "use strict";

  const STATUS_POLL_MS = 3000;
  // After Stop the server answers with a "done" (finish_reason "cancelled"); if that never
  // comes, the page ends the turn itself rather than leave the user locked out.
  const STOP_GRACE_MS = 2000;
  // Within this distance of the bottom the view follows new text; further up, the user is reading.
  const PINNED_SLACK_PX = 48;

  const ROLE_LABELS = { user: "You", assistant: "Model", error: "Error" };
  const KNOWN_STATES = ["not_loaded", "loading", "loaded", "error"];
  // The model select's groups, in this order; a backend not named here gets a group of its own.
  const BACKEND_GROUPS = [
    ["llamacpp", "GGUF · llama.cpp"],
    ["transformers", "Hugging Face · transformers"],
    ["openai", "Remote · OpenAI-compatible server"],
  ];

  const byId = (id) => document.getElementById(id);
  const els = {
    messages: byId("messages"),
    emptyHint: byId("empty-hint"),
    composer: byId("composer"),
    prompt: byId("prompt"),
    send: byId("send"),
    stop: byId("stop"),
    newChat: byId("new-chat"),
    system: byId("system"),
    temperature: byId("temperature"),
    topP: byId("top-p"),
    maxTokens: byId("max-tokens"),
    streamToggle: byId("stream-toggle"),
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
    modelNCtx: byId("model-n-ctx"),
    modelQueue: byId("model-queue"),
    modelError: byId("model-error"),
    topbarModel: byId("topbar-model"),
  };

  /** The committed conversation, sent whole with every turn. */
  const conversation = [];
  let activeTurn = null;

  // ---------------------------------------------------------------- rendering

  function isPinnedToBottom() {
    const box = els.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight <= PINNED_SLACK_PX;
  }

  function scrollToBottom() {
    els.messages.scrollTop = els.messages.scrollHeight;
  }

  /** Runs a change to the conversation and keeps the newest text in view if it was in view. */
  function followingNewText(change) {
    const pinned = isPinnedToBottom();
    change();
    if (pinned) scrollToBottom();
  }

  function makeElement(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  /** Adds one message to the conversation view, its text inserted literally. */
  function renderMessage(role, text) {
    const el = makeElement("div", `msg ${role}`);
    el.append(makeElement("div", "role", ROLE_LABELS[role] || String(role)), makeElement("div", "content", String(text)));
    els.emptyHint.hidden = true;
    followingNewText(() => els.messages.append(el));
    return el;
  }

  function renderError(text) {
    return renderMessage("error", text);
  }

  function formatFigures({ finishReason, usage, timings }) {
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    // With no token there is no first-token time, and a speed needs at least two tokens.
    const produced = !usage || usage.completion_tokens > 0;
    if (timings && produced) {
      parts.push(`TTFT ${Math.round(timings.ttft_ms)} ms`);
      if (timings.tokens_per_second > 0) parts.push(`${Number(timings.tokens_per_second).toFixed(1)} tokens/s`);
      if (timings.queue_ms >= 100) parts.push(`queued ${Math.round(timings.queue_ms)} ms`);
    }
    if (finishReason && finishReason !== "stop") parts.push(finishReason);
    return parts.join(" · ");
  }

  // ---------------------------------------------------------------- talking to the server

  class ApiError extends Error {}

  /** Turns a failed response into one readable line, using the server's JSON error when there is one. */
  async function describeFailure(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      // not JSON (a proxy's HTML page, say): the status line is all there is
    }
    if (body && typeof body.error === "string") {
      const where = [body.type, body.field && `field ${body.field}`].filter(Boolean).join(", ");
      return `${body.error}${where ? ` (${where})` : ""}`;
    }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  // ---------------------------------------------------------------- API key
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
        const key = window.prompt(refused ? "The API key was refused. API key:" : "This server needs an API key:");
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

  async function postJson(url, body, signal) {
    let response;
    try {
      response = await apiFetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`could not reach the server: ${err.message}`);
    }
    if (!response.ok) throw new ApiError(await describeFailure(response));
    return response.json();
  }

  function newRequestId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID().replace(/-/g, "");
    // randomUUID needs a secure context; a tester on http://<lan-ip> does not have one.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function requestStop(requestId) {
    postJson("/api/stop", { request_id: requestId }).catch(() => {
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

  // ---------------------------------------------------------------- one turn

  class Turn {
    constructor(userText) {
      this.id = newRequestId();
      this.userMessage = { role: "user", content: userText };
      this.userEl = renderMessage("user", userText);
      this.el = renderMessage("assistant", "");
      this.el.classList.add("streaming");
      this.answerNode = document.createTextNode("");
      this.el.querySelector(".content").append(this.answerNode);
      this.noteEl = makeElement("div", "note");
      this.noteEl.hidden = true;
      this.el.append(this.noteEl, makePromptView(() => this.promptBody));
      this.promptBody = null; // the conversation this turn sent, for its "prompt" view
      this.answer = "";
      this.ended = false;
      this.stopRequested = false;
      this.eventSource = null;
      this.stopTimer = null;
      this.fetchAbort = new AbortController();
      scrollToBottom(); // the user just sent: bring the new turn into view even if they had scrolled up
    }

    append(text) {
      if (this.ended || !text) return;
      this.answer += text;
      this.setNote("");
      // appendData keeps one text node growing instead of re-rendering the whole answer per token
      followingNewText(() => this.answerNode.appendData(text));
    }

    setNote(text) {
      this.noteEl.textContent = text;
      this.noteEl.hidden = !text;
    }

    /** Ends the turn once, whichever of done / error / stop timeout / dropped connection comes first. */
    finish({ finishReason, usage = null, timings = null, error = null }) {
      if (this.ended) return;
      this.ended = true;
      clearTimeout(this.stopTimer);
      if (this.eventSource) this.eventSource.close();
      this.el.classList.remove("streaming");
      this.setNote("");

      followingNewText(() => {
        const figures = formatFigures({ finishReason: error ? null : finishReason, usage, timings });
        // figures go above the prompt view, next to the answer they describe
        if (figures) this.el.querySelector(".msg-tools").before(makeElement("div", "figures", figures));
        if (error) {
          if (!this.answer) this.el.remove();
          renderError(error);
        }
      });

      // A partial answer (stopped or cut off) stays in the history; a turn that produced
      // nothing is not kept, so the next request does not carry an unanswered message.
      if (this.answer) {
        conversation.push(this.userMessage, { role: "assistant", content: this.answer });
      } else {
        this.userEl.classList.add("unsent");
        this.userEl.title = "Not kept in the conversation: the model gave no answer";
        if (!error) this.el.classList.add("empty");
      }

      if (activeTurn === this) activeTurn = null;
      setGenerating(false);
    }
  }

  // ---------------------------------------------------------------- the rendered prompt

  /**
   * A "prompt" toggle and the exact string the model saw for a turn: the server renders the
   * turn's conversation with the same template and tokenizer generation uses. Shown as text,
   * so special tokens such as <|im_start|> stay visible instead of being read as markup.
   */
  function makePromptView(getBody) {
    const tools = makeElement("div", "msg-tools");
    const toggle = makeElement("button", "prompt-toggle", "prompt");
    toggle.type = "button";
    toggle.title = "Show the exact prompt the model saw for this turn";
    toggle.setAttribute("aria-expanded", "false");
    const view = makeElement("div", "prompt-view");
    view.hidden = true;
    const caption = makeElement("div", "prompt-caption");
    const pre = makeElement("pre", "rendered-prompt");
    view.append(caption, pre);
    tools.append(toggle, view);

    let loaded = false;
    toggle.addEventListener("click", async () => {
      const open = view.hidden;
      view.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
      if (!open || loaded) return;
      const body = getBody();
      if (!body) return;
      caption.textContent = "rendering…";
      pre.textContent = "";
      try {
        const rendered = await postJson("/api/apply_template", body);
        pre.textContent = rendered.prompt;
        caption.textContent = `${rendered.token_count} tokens, exactly as the model reads them`;
        loaded = true; // a failure is retried on the next open
      } catch (err) {
        caption.textContent = `could not render the prompt: ${err.message}`;
      }
    });
    return tools;
  }

  function generationBody(messages, requestId) {
    const body = {
      messages,
      // Our own id lets Stop reach the server even before /api/streams or /api/chat answers.
      request_id: requestId,
      max_new_tokens: Number(els.maxTokens.value),
      temperature: Number(els.temperature.value),
      top_p: Number(els.topP.value),
    };
    const system = els.system.value;
    if (system.trim()) body.system = system;
    return body;
  }

  async function runStreamed(turn, body) {
    const created = await postJson("/api/streams", body);
    turn.id = created.stream_id;
    if (turn.stopRequested) {
      // Stop was pressed before the stream existed: drop the parked request unopened.
      requestStop(turn.id);
      turn.finish({ finishReason: "cancelled" });
      return;
    }
    const source = new EventSource(created.url);
    turn.eventSource = source;
    source.addEventListener("queue", (event) => {
      turn.setNote(`waiting, position ${parseEventData(event).position}`);
    });
    source.addEventListener("token", (event) => turn.append(parseEventData(event).text));
    source.addEventListener("done", (event) => {
      const data = parseEventData(event);
      turn.finish({ finishReason: data.finish_reason, usage: data.usage, timings: data.timings });
    });
    // The server's own "event: error" and a dropped connection arrive on the same listener;
    // only the former carries data.
    source.addEventListener("error", (event) => {
      if (typeof event.data === "string") {
        const data = parseEventData(event);
        const where = data.type ? ` (${data.type})` : "";
        turn.finish({ finishReason: "error", error: `${data.error || "generation failed"}${where}` });
      } else if (turn.stopRequested) {
        turn.finish({ finishReason: "cancelled" });
      } else {
        turn.finish({ finishReason: "error", error: "the connection to the server was lost before the answer finished" });
      }
    });
  }

  async function runWhole(turn, body) {
    turn.setNote("generating…");
    const result = await postJson("/api/chat", body, turn.fetchAbort.signal);
    turn.append(result.response);
    turn.finish({ finishReason: result.finish_reason, usage: result.usage, timings: result.timings });
  }

  function send() {
    if (activeTurn || modelBusy || serverLoading) return;
    const text = els.prompt.value;
    if (!text.trim()) return;
    els.prompt.value = "";

    const turn = new Turn(text);
    activeTurn = turn;
    setGenerating(true);

    const body = generationBody([...conversation, turn.userMessage], turn.id);
    turn.promptBody = { messages: body.messages, ...(body.system ? { system: body.system } : {}) };
    const run = els.streamToggle.checked ? runStreamed : runWhole;
    run(turn, body).catch((err) => {
      if (err.name === "AbortError") {
        turn.finish({ finishReason: "cancelled" });
      } else {
        turn.finish({ finishReason: "error", error: err.message });
      }
    });
  }

  function stop() {
    const turn = activeTurn;
    if (!turn || turn.stopRequested) return;
    turn.stopRequested = true;
    els.stop.disabled = true;
    turn.setNote("stopping…");
    requestStop(turn.id);
    turn.stopTimer = setTimeout(() => {
      // Stop pressed within moments of Send can reach the server before the generation is
      // registered; a second request catches it, since a dropped fetch alone would not.
      requestStop(turn.id);
      turn.fetchAbort.abort();
      turn.finish({ finishReason: "cancelled" });
    }, STOP_GRACE_MS);
  }

  function newChat() {
    if (activeTurn) return;
    conversation.length = 0;
    for (const el of Array.from(els.messages.children)) {
      if (el !== els.emptyHint) el.remove();
    }
    els.emptyHint.hidden = false;
    els.prompt.focus();
  }

  function setGenerating(generating) {
    els.prompt.disabled = generating;
    els.newChat.disabled = generating;
    els.stop.disabled = !generating;
    updateSendButton();
    if (!generating && window.matchMedia("(pointer: fine)").matches) els.prompt.focus();
  }

  /** Send waits while a turn runs and while a model is being loaded or unloaded. */
  function updateSendButton() {
    els.send.disabled = Boolean(activeTurn) || modelBusy || serverLoading;
  }

  // ---------------------------------------------------------------- model status

  let lastLoadError = null;
  let modelBusy = false; // this page's load or unload request is in flight
  let serverLoading = false; // the server says a load is under way (perhaps from another tab)
  let lastStatus = null;

  function fileName(path) {
    if (!path) return "—";
    return String(path).split(/[\\/]/).pop();
  }

  function showState(state) {
    const known = state === "unloading" ? "loading" : KNOWN_STATES.includes(state) ? state : "unknown";
    els.modelState.textContent = state || "unknown";
    els.modelState.className = `badge state-${known}`;
  }

  function showModelError(text) {
    els.modelError.textContent = text || "";
    els.modelError.hidden = !text;
  }

  /** What is loaded, as one comparable value: the picker follows it when it changes. */
  function loadedKey(status) {
    return status ? `${status.state}|${status.backend}|${status.model}|${status.adapter}` : "";
  }

  /**
   * Shows the server's status. With `follow`, a change of what is loaded also moves the picker
   * to it and retires this page's last load error; after a failed load the picker keeps the
   * user's choice instead, so they can correct it.
   */
  function showStatus(status, follow = true) {
    const changed = follow && loadedKey(status) !== loadedKey(lastStatus);
    if (changed && lastStatus && !modelBusy) lastLoadError = null;
    lastStatus = status;

    showState(status.state);
    els.modelName.textContent = fileName(status.model);
    els.modelName.title = status.model || "";
    els.modelBackend.textContent = status.backend || "—";
    els.modelAdapter.textContent = status.adapter ? fileName(status.adapter) : "none";
    els.modelAdapter.title = status.adapter || "";
    els.modelDevice.textContent = status.device || "—";
    els.modelNCtx.textContent = status.n_ctx != null ? String(status.n_ctx) : "—";
    const queue = status.queue;
    els.modelQueue.textContent = queue ? `${queue.running} running, ${queue.waiting} waiting` : "—";
    showModelError(lastLoadError || status.error);
    const label = status.model_name || fileName(status.model);
    els.topbarModel.textContent = `${label} · ${status.state}`;
    els.topbarModel.title = [status.model, status.adapter].filter(Boolean).join(" + ");

    serverLoading = status.state === "loading";
    updateSendButton();
    // Loaded elsewhere (another tab, the API) by a path the list lacks: fetch the list again.
    if (changed && !modelBusy && !selectLoaded() && status.model && catalogLoaded) refreshModels(true);
  }

  async function refreshStatus(follow = true) {
    try {
      const response = await apiFetch("/api/model_status", { cache: "no-store" });
      if (!response.ok) throw new ApiError(await describeFailure(response));
      showStatus(await response.json(), follow);
    } catch (err) {
      showState("unreachable");
      showModelError(`status unavailable: ${err.message}`);
      els.topbarModel.textContent = "server unreachable";
    }
  }

  function pollStatus() {
    refreshStatus().finally(() => setTimeout(pollStatus, STATUS_POLL_MS));
  }

  // ---------------------------------------------------------------- model picker

  /** The last answer of /api/models. */
  let catalog = { models: [], adapters: [] };
  let catalogLoaded = false;

  /** The adapters that fit the model with this id (the server lists each adapter's bases). */
  function adaptersFor(modelId, adapters) {
    if (!modelId || !Array.isArray(adapters)) return [];
    return adapters.filter((adapter) => Array.isArray(adapter.bases) && adapter.bases.includes(modelId));
  }

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

  function modelOptionText(model) {
    const parts = [String(model.name || model.id)];
    const size = formatSize(model.size_bytes);
    if (size) parts.push(size);
    let text = parts.join(" · ");
    if (model.trust_remote_code) text += " (remote code)";
    if (!model.available) text += " (not downloaded)";
    return text;
  }

  function selectedModel() {
    const option = els.modelSelect.selectedOptions[0];
    return option && option.value ? option.model : null;
  }

  function setPickerNote(text) {
    els.pickerNote.textContent = text || "";
    els.pickerNote.hidden = !text;
  }

  /** Fills the adapter select for the chosen model, keeping `wanted` (a path) selected if it fits. */
  function renderAdapters(wanted) {
    const model = selectedModel();
    // The server matches each adapter to its bases on one backend (PEFT folders to transformers
    // models, GGUF LoRA files to GGUF models), so `bases` alone says what fits this model.
    const fitting = model ? adaptersFor(model.id, catalog.adapters) : [];
    const none = makeElement("option", "", "No adapter");
    none.value = "";
    const options = [none];
    for (const adapter of fitting) {
      const text = adapter.rank != null ? `${adapter.name} · r${adapter.rank}` : String(adapter.name);
      const option = makeElement("option", "", text);
      option.value = adapter.path;
      option.title = [adapter.path, adapter.base_model_name_or_path && `base: ${adapter.base_model_name_or_path}`]
        .filter(Boolean)
        .join("\n");
      options.push(option);
    }
    els.adapterSelect.replaceChildren(...options);
    els.adapterSelect.value = fitting.some((adapter) => adapter.path === wanted) ? wanted : "";
    els.adapterSelect.disabled = fitting.length === 0 || modelBusy;

    if (!model) setPickerNote("");
    else if (model.backend === "openai") setPickerNote("A remote server serves its adapters as models of their own.");
    else if (!fitting.length && model.backend === "llamacpp" && catalog.adapters.length) {
      setPickerNote("No GGUF LoRA here fits this model (scripts.convert_to_gguf --lora-only makes one).");
    } else if (!fitting.length && catalog.adapters.length) setPickerNote("No adapter here was trained on this model.");
    else setPickerNote("");
  }

  /**
   * Builds the model select from the catalog: one group per backend, missing weights disabled.
   * With `follow` it then selects what is loaded; without, it keeps the user's choice.
   */
  function renderModels(follow) {
    const previous = els.modelSelect.value;
    const previousAdapter = els.adapterSelect.value;
    const groups = new Map();
    const groupFor = (backend) => {
      if (!groups.has(backend)) {
        const group = makeElement("optgroup");
        const known = BACKEND_GROUPS.find(([name]) => name === backend);
        group.label = known ? known[1] : String(backend);
        groups.set(backend, group);
      }
      return groups.get(backend);
    };
    for (const [backend] of BACKEND_GROUPS) groupFor(backend); // the usual order, whatever the list's
    const addOption = (model, text) => {
      const option = makeElement("option", "", text);
      option.value = model.id;
      option.title = [model.path, model.kind && `(${model.kind})`].filter(Boolean).join(" ");
      option.disabled = !model.available;
      option.model = model;
      groupFor(model.backend).append(option);
      return option;
    };
    for (const model of catalog.models) addOption(model, modelOptionText(model));

    // A model loaded by a path the catalog does not list still shows as what is loaded.
    const status = lastStatus;
    if (status && status.model && !catalog.models.some((model) => model.path === status.model)) {
      addOption({ id: status.model, name: fileName(status.model), backend: status.backend || "other", path: status.model,
                  available: true, external: true }, `${fileName(status.model)} (by path)`);
    }

    const filled = Array.from(groups.values()).filter((group) => group.children.length > 0);
    if (filled.length) {
      els.modelSelect.replaceChildren(...filled);
    } else {
      const empty = makeElement("option", "", "no models found");
      empty.value = "";
      empty.disabled = true;
      els.modelSelect.replaceChildren(empty);
    }
    const keep = previous && Array.from(els.modelSelect.options).some((o) => o.value === previous && !o.disabled);
    if ((follow || !keep) && selectLoaded()) return;
    if (keep) els.modelSelect.value = previous;
    renderAdapters(previousAdapter);
  }

  /** Points the selects at what the server says is loaded; false when the list does not have it. */
  function selectLoaded() {
    const status = lastStatus;
    const option = status && Array.from(els.modelSelect.options).find((o) => o.model && o.model.path === status.model);
    if (!option) {
      renderAdapters("");
      return false;
    }
    els.modelSelect.value = option.value;
    renderAdapters(status.adapter || "");
    return true;
  }

  async function refreshModels(follow = true) {
    try {
      const response = await apiFetch("/api/models", { cache: "no-store" });
      if (!response.ok) throw new ApiError(await describeFailure(response));
      const body = await response.json();
      catalog = {
        models: Array.isArray(body.models) ? body.models : [],
        adapters: Array.isArray(body.adapters) ? body.adapters : [],
      };
      catalogLoaded = true;
      renderModels(follow);
    } catch (err) {
      setPickerNote(`model list unavailable: ${err.message}`);
    }
  }

  function setModelBusy(busy) {
    modelBusy = busy;
    els.loadModel.disabled = busy;
    els.unloadModel.disabled = busy;
    els.modelSelect.disabled = busy;
    if (busy) els.adapterSelect.disabled = true;
    else renderAdapters(els.adapterSelect.value);
    updateSendButton();
  }

  /** Runs one load or unload request; the status it answers with (or its error) updates the panel. */
  async function changeModel(url, body, busyLabel) {
    if (modelBusy) return;
    let succeeded = false;
    setModelBusy(true);
    lastLoadError = null;
    showModelError("");
    showState(busyLabel);
    try {
      const status = await postJson(url, body);
      succeeded = true;
      setModelBusy(false);
      lastStatus = null; // follow what the server now has, even if it is what it had
      showStatus(status);
    } catch (err) {
      lastLoadError = `${url.endsWith("unload_model") ? "unload" : "load"} failed: ${err.message}`;
      showModelError(lastLoadError);
      setModelBusy(false);
      await refreshStatus(false);
    } finally {
      await refreshModels(succeeded);
    }
  }

  function loadModel() {
    const model = selectedModel();
    if (!model) {
      lastLoadError = "choose a model to load";
      showModelError(lastLoadError);
      return Promise.resolve();
    }
    const body = { model: model.external ? model.path : model.id, backend: model.backend };
    if (els.adapterSelect.value) body.adapter = els.adapterSelect.value;
    return changeModel("/api/load_model", body, "loading");
  }

  function unloadModel() {
    return changeModel("/api/unload_model", {}, "unloading");
  }

  // ---------------------------------------------------------------- wiring

  function bindSlider(input, decimals) {
    const output = byId(`${input.id}-value`);
    const show = () => {
      output.textContent = Number(input.value).toFixed(decimals);
    };
    input.addEventListener("input", show);
    show();
  }

  bindSlider(els.temperature, 2);
  bindSlider(els.topP, 2);
  bindSlider(els.maxTokens, 0);

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  els.prompt.addEventListener("keydown", (event) => {
    // isComposing: Enter that confirms an IME candidate (Chinese, Japanese input) must not send
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      send();
    }
  });
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", newChat);
  els.loadModel.addEventListener("click", loadModel);
  els.unloadModel.addEventListener("click", unloadModel);
  els.modelSelect.addEventListener("change", () => renderAdapters(els.adapterSelect.value));

  pollStatus();
  refreshModels();

  window.modelTest = {
    renderMessage,
    send,
    stop,
    newChat,
    loadModel,
    unloadModel,
    refreshModels,
    adaptersFor,
    conversation: () => conversation.map((message) => ({ ...message })),
  };
})();
