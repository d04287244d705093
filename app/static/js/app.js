/* model_test page: chat with the loaded model while its tokens stream in, pick and load
 * models, and switch between the chat, compare and evaluate views.
 *
 * Everything the model or the server says goes into the page as text nodes, never as HTML:
 * a fine-tune under test may well emit markup.
 */
(() => {
  "use strict";

  const MT = (window.MT = window.MT || {});
  const { t } = MT.i18n;
  const { makeElement, makeButton, makeFigures, fileName, ApiError, describeFailure, apiFetch, postJson, newRequestId,
          requestStop, openGenerationStream } = MT.core;
  const picker = MT.picker;

  const STATUS_POLL_MS = 3000;
  const LOADING_POLL_MS = 1000;
  // After Stop the server answers with a "done" (finish_reason "cancelled"); if that never
  // comes, the page ends the turn itself rather than leave the user locked out.
  const STOP_GRACE_MS = 2000;
  // Within this distance of the bottom the view follows new text; further up, the user is reading.
  const PINNED_SLACK_PX = 48;

  const ROLE_KEYS = { user: "role.user", assistant: "role.assistant", error: "role.error" };
  const KNOWN_STATES = ["not_loaded", "loading", "loaded", "error"];

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

  /** The committed conversation, sent whole with every turn, and the element of each message. */
  const conversation = [];
  const messageEls = [];
  /** The stored record of the open conversation (history.js); null until its first answer. */
  let record = null;
  let activeTurn = null;

  // ---------------------------------------------------------------- views

  const VIEWS = ["chat", "compare", "evaluate"];

  function showView(name) {
    if (!VIEWS.includes(name)) return;
    document.body.dataset.view = name;
    for (const view of VIEWS) {
      const tab = byId(`tab-${view}`);
      tab.setAttribute("aria-selected", String(view === name));
      tab.tabIndex = view === name ? 0 : -1;
      byId(`view-${view}`).hidden = view !== name;
    }
    document.dispatchEvent(new CustomEvent("mt:view", { detail: name }));
  }

  for (const view of VIEWS) {
    const tab = byId(`tab-${view}`);
    tab.addEventListener("click", () => showView(view));
    // Arrow keys move between tabs, as in every tab strip a screen reader knows.
    tab.addEventListener("keydown", (event) => {
      const step = event.key === "ArrowRight" ? 1 : event.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const next = VIEWS[(VIEWS.indexOf(view) + step + VIEWS.length) % VIEWS.length];
      showView(next);
      byId(`tab-${next}`).focus();
    });
  }

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

  /** Adds one message to the conversation view, its text inserted literally. */
  function renderMessage(role, text) {
    const el = makeElement("div", `msg ${role}`);
    const label = makeElement("div", "role");
    if (ROLE_KEYS[role]) MT.i18n.bind(label, ROLE_KEYS[role]);
    else label.textContent = String(role);
    el.append(label, makeElement("div", "content", String(text)));
    els.emptyHint.hidden = true;
    followingNewText(() => els.messages.append(el));
    return el;
  }

  function renderError(text) {
    return renderMessage("error", text);
  }

  /** An assistant message with its note line and its "prompt" view (for the turn that asked it). */
  function renderAssistant(text, getPromptBody) {
    const el = renderMessage("assistant", text);
    const note = makeElement("div", "note");
    note.hidden = true;
    el.append(note, makePromptView(getPromptBody));
    return el;
  }

  function clearMessages() {
    for (const el of Array.from(els.messages.children)) {
      if (el !== els.emptyHint) el.remove();
    }
    els.emptyHint.hidden = false;
  }

  // ---------------------------------------------------------------- one turn

  /**
   * One request to the model. "new" asks a new user message, "regenerate" asks the last one
   * again (its old answer already dropped), "continue" extends the last answer in place.
   */
  class Turn {
    constructor(kind, { userText = "", userEl = null, assistantEl = null, prefix = "" } = {}) {
      this.kind = kind;
      this.id = newRequestId();
      this.prefix = prefix;
      this.answer = "";
      this.ended = false;
      this.stopRequested = false;
      this.eventSource = null;
      this.stopTimer = null;
      this.fetchAbort = new AbortController();
      this.promptBody = null; // the conversation this turn sent, for its "prompt" view

      if (kind === "continue") {
        this.userMessage = null;
        this.el = assistantEl;
        this.el.classList.remove("empty");
        const oldFigures = this.el.querySelector(".figures");
        if (oldFigures) oldFigures.remove();
      } else {
        this.userMessage = { role: "user", content: userText };
        this.userEl = userEl || renderMessage("user", userText);
        this.userEl.classList.remove("unsent");
        this.userEl.removeAttribute("title");
        this.el = renderAssistant("", () => this.promptBody);
      }
      this.el.classList.add("streaming");
      this.answerNode = document.createTextNode("");
      this.el.querySelector(".content").append(this.answerNode);
      this.noteEl = this.el.querySelector(".note");
      scrollToBottom(); // the user just sent: bring the new turn into view even if they had scrolled up
    }

    append(text) {
      if (this.ended || !text) return;
      this.answer += text;
      this.setNote("");
      // appendData keeps one text node growing instead of re-rendering the whole answer per token
      followingNewText(() => this.answerNode.appendData(text));
    }

    setNote(key, vars) {
      if (key) MT.i18n.bind(this.noteEl, key, vars);
      else this.noteEl.textContent = "";
      this.noteEl.hidden = !key;
    }

    /** Ends the turn once, whichever of done / error / stop timeout / dropped connection comes first. */
    finish({ finishReason, usage = null, timings = null, error = null }) {
      if (this.ended) return;
      this.ended = true;
      clearTimeout(this.stopTimer);
      if (this.eventSource) this.eventSource.close();
      this.el.classList.remove("streaming");
      this.setNote("");

      const continuing = this.kind === "continue";
      followingNewText(() => {
        const figures = makeFigures({ finishReason: error ? null : finishReason, usage, timings });
        // figures go above the prompt view, next to the answer they describe
        if (figures) this.el.querySelector(".msg-tools").before(figures);
        if (error) {
          if (!this.answer && !continuing) this.el.remove();
          renderError(error);
        }
      });

      // A partial answer (stopped or cut off) stays in the history; a turn that produced
      // nothing is not kept, so the next request does not carry an unanswered message.
      if (continuing) {
        conversation.push({ role: "assistant", content: this.prefix + this.answer });
        messageEls.push(this.el);
      } else if (this.answer) {
        conversation.push(this.userMessage, { role: "assistant", content: this.answer });
        messageEls.push(this.userEl, this.el);
      } else {
        this.userEl.classList.add("unsent");
        this.userEl.title = t("chat.unsent");
        if (!error) this.el.classList.add("empty");
      }

      if (activeTurn === this) activeTurn = null;
      if (this.answer || continuing) persist();
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
    const toggle = makeButton("prompt-toggle", "prompt.toggle");
    MT.i18n.bind(toggle, "prompt.toggle_title", null, "title");
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
      MT.i18n.bind(caption, "prompt.rendering");
      pre.textContent = "";
      try {
        const rendered = await postJson("/api/apply_template", body);
        pre.textContent = rendered.prompt;
        MT.i18n.bind(caption, "prompt.caption", { n: rendered.token_count });
        loaded = true; // a failure is retried on the next open
      } catch (err) {
        MT.i18n.bind(caption, "prompt.failed", { reason: err.message });
      }
    });
    return tools;
  }

  /** The sampling settings of the sidebar, as generation bodies and exported conversations name them. */
  function generationParams() {
    return {
      max_new_tokens: Number(els.maxTokens.value),
      temperature: Number(els.temperature.value),
      top_p: Number(els.topP.value),
    };
  }

  function generationBody(messages, requestId) {
    // Our own id lets Stop reach the server even before /api/streams or /api/chat answers.
    const body = { messages, request_id: requestId, ...generationParams() };
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
    turn.eventSource = openGenerationStream(created.url, {
      queue: (data) => turn.setNote("chat.waiting", { position: data.position }),
      token: (text) => turn.append(text),
      done: (data) => turn.finish({ finishReason: data.finish_reason, usage: data.usage, timings: data.timings }),
      error: (message) => turn.finish({ finishReason: "error", error: message }),
      lost: () => {
        if (turn.stopRequested) turn.finish({ finishReason: "cancelled" });
        else turn.finish({ finishReason: "error", error: t("chat.lost") });
      },
    });
  }

  async function runWhole(turn, body) {
    turn.setNote("chat.generating");
    const result = await postJson("/api/chat", body, turn.fetchAbort.signal);
    turn.append(result.response);
    turn.finish({ finishReason: result.finish_reason, usage: result.usage, timings: result.timings });
  }

  function canStart() {
    return !activeTurn && !modelBusy && !serverLoading;
  }

  /** Sends `messages` for `turn`; `extra` joins the body (continue_final for a continuation). */
  function startTurn(turn, messages, extra = {}) {
    activeTurn = turn;
    setGenerating(true);
    const body = { ...generationBody(messages, turn.id), ...extra };
    if (turn.kind !== "continue") turn.promptBody = { messages: body.messages, ...(body.system ? { system: body.system } : {}) };
    const run = els.streamToggle.checked ? runStreamed : runWhole;
    run(turn, body).catch((err) => {
      if (err.name === "AbortError") turn.finish({ finishReason: "cancelled" });
      else turn.finish({ finishReason: "error", error: err.message });
    });
  }

  function send() {
    if (!canStart()) return;
    const text = els.prompt.value;
    if (!text.trim()) return;
    els.prompt.value = "";
    const turn = new Turn("new", { userText: text });
    startTurn(turn, [...conversation, turn.userMessage]);
  }

  /** Drops the last answer and asks its question again. */
  function regenerate() {
    const n = conversation.length;
    if (!canStart() || n < 2 || conversation[n - 1].role !== "assistant" || conversation[n - 2].role !== "user") return;
    conversation.pop();
    messageEls.pop().remove();
    const question = conversation.pop();
    const userEl = messageEls.pop();
    const turn = new Turn("regenerate", { userText: question.content, userEl });
    startTurn(turn, [...conversation, turn.userMessage]);
  }

  /** Asks the model to go on from the end of its last answer; the new text joins that answer. */
  function continueAnswer() {
    const n = conversation.length;
    if (!canStart() || !n || conversation[n - 1].role !== "assistant") return;
    const last = conversation.pop();
    const turn = new Turn("continue", { assistantEl: messageEls.pop(), prefix: last.content });
    startTurn(turn, [...conversation, last], { continue_final: true });
  }

  /** Regenerate and Continue sit under the last answer only, and only between turns. */
  function refreshAnswerActions() {
    for (const el of els.messages.querySelectorAll(".answer-actions")) el.remove();
    const n = conversation.length;
    if (activeTurn || !n || conversation[n - 1].role !== "assistant") return;
    const tools = messageEls[n - 1] && messageEls[n - 1].querySelector(".msg-tools");
    if (!tools) return;
    const actions = makeElement("span", "answer-actions");
    const canRegenerate = n >= 2 && conversation[n - 2].role === "user";
    if (canRegenerate) actions.append(makeButton("regenerate", "chat.regenerate", regenerate));
    actions.append(makeButton("continue", "chat.continue", continueAnswer));
    for (const button of actions.children) button.disabled = !canStart();
    tools.prepend(actions);
  }

  function stop() {
    const turn = activeTurn;
    if (!turn || turn.stopRequested) return;
    turn.stopRequested = true;
    els.stop.disabled = true;
    turn.setNote("chat.stopping");
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
    messageEls.length = 0;
    record = null;
    MT.history.setCurrent(null);
    clearMessages();
    els.prompt.focus();
  }

  function setGenerating(generating) {
    els.prompt.disabled = generating;
    els.newChat.disabled = generating;
    els.stop.disabled = !generating;
    MT.history.setLocked(generating);
    updateSendButton();
    refreshAnswerActions();
    if (!generating && window.matchMedia("(pointer: fine)").matches && document.body.dataset.view === "chat") els.prompt.focus();
  }

  /** Send waits while a turn runs and while a model is being loaded or unloaded. */
  function updateSendButton() {
    els.send.disabled = !canStart();
    for (const button of els.messages.querySelectorAll(".answer-actions button")) button.disabled = !canStart();
  }

  // ---------------------------------------------------------------- the history of conversations

  /** What served the conversation, from the last status: exported with it so a run can be repeated. */
  function modelInfo() {
    const status = lastStatus;
    if (!status) return null;
    return { model: status.model, model_name: status.model_name, backend: status.backend, adapter: status.adapter };
  }

  /** Saves the open conversation to this browser's history after each turn. */
  function persist() {
    if (!conversation.length) return;
    const now = new Date().toISOString();
    if (!record) record = { id: newRequestId(), created: now, title: MT.history.titleOf(conversation) };
    Object.assign(record, {
      updated: now,
      model: modelInfo(),
      system: els.system.value,
      params: generationParams(),
      messages: conversation.map((message) => ({ ...message })),
    });
    MT.history.save(record);
  }

  function setSlider(input, value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return;
    input.value = String(value);
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  /** Shows a stored conversation, with the system prompt and sampling it was had with. */
  function openConversation(stored) {
    if (activeTurn) return;
    showView("chat");
    conversation.length = 0;
    messageEls.length = 0;
    clearMessages();
    record = { ...stored };
    els.system.value = stored.system || "";
    const params = stored.params || {};
    setSlider(els.temperature, params.temperature);
    setSlider(els.topP, params.top_p);
    setSlider(els.maxTokens, params.max_new_tokens);

    const model = stored.model;
    const served = lastStatus && lastStatus.model;
    if (model && model.model && served && model.model !== served) {
      const note = makeElement("p", "chat-note");
      MT.i18n.bind(note, "chat.recorded_with", { model: model.model_name || fileName(model.model), backend: model.backend || "?" });
      els.messages.append(note);
    }
    const system = stored.system && stored.system.trim() ? { system: stored.system } : {};
    for (const message of stored.messages) {
      const before = conversation.slice();
      const el = message.role === "assistant"
        ? renderAssistant(message.content, () => ({ messages: before, ...system }))
        : renderMessage(message.role, message.content);
      conversation.push({ role: message.role, content: message.content });
      messageEls.push(el);
    }
    MT.history.setCurrent(record.id);
    refreshAnswerActions();
    scrollToBottom();
  }

  MT.history.onOpen(openConversation);
  document.addEventListener("mt:history-deleted-current", () => {
    if (!activeTurn) newChat();
    else record = null; // the running turn saves it again as a new conversation
  });

  // ---------------------------------------------------------------- model status

  let lastLoadError = null;
  let modelBusy = false; // this page's load or unload request is in flight
  let serverLoading = false; // the server says a load is under way (perhaps from another tab)
  let lastStatus = null;

  function stateLabel(state) {
    return state && MT.i18n.has(`state.${state}`) ? t(`state.${state}`) : state || t("state.unknown");
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
    els.modelAdapter.textContent = status.adapter ? fileName(status.adapter) : t("model.no_adapter");
    els.modelAdapter.title = status.adapter || "";
    els.modelDevice.textContent = status.device || "—";
    els.modelNCtx.textContent = status.n_ctx != null ? String(status.n_ctx) : "—";
    const queue = status.queue;
    els.modelQueue.textContent = queue ? t("model.queue", { running: queue.running, waiting: queue.waiting }) : "—";
    showModelError(lastLoadError || status.error);
    const label = status.model_name || fileName(status.model);
    els.topbarModel.removeAttribute("data-i18n"); // from here on it names what the server has
    els.topbarModel.textContent = `${label} · ${stateLabel(status.state)}`;
    els.topbarModel.title = [status.model, status.adapter].filter(Boolean).join(" + ");

    serverLoading = status.state === "loading";
    updateSendButton();
    document.dispatchEvent(new CustomEvent("mt:status", { detail: status }));
    // Loaded elsewhere (another tab, the API) by a path the list lacks: fetch the list again.
    if (changed && !modelBusy && !selectLoaded() && status.model && catalogLoaded) refreshModels(true);
  }

  let unreachableReason = null;

  function showUnreachable() {
    showState("unreachable");
    showModelError(t("model.status_unavailable", { reason: unreachableReason }));
    MT.i18n.bind(els.topbarModel, "model.server_unreachable");
  }

  // Bumped when a load or unload ends: a status fetched before then is older news than its answer.
  let statusEpoch = 0;

  async function refreshStatus(follow = true) {
    const epoch = statusEpoch;
    try {
      const response = await apiFetch("/api/model_status", { cache: "no-store" });
      if (!response.ok) throw new ApiError(await describeFailure(response));
      const status = await response.json();
      if (epoch !== statusEpoch) return;
      unreachableReason = null;
      showStatus(status, follow);
    } catch (err) {
      if (epoch !== statusEpoch) return;
      unreachableReason = err.message;
      showUnreachable();
    }
  }

  function pollStatus() {
    refreshStatus().finally(() => setTimeout(pollStatus, STATUS_POLL_MS));
  }

  // ---------------------------------------------------------------- model picker

  /** The last answer of /api/models. */
  let catalog = { models: [], adapters: [] };
  let catalogLoaded = false;

  function setPickerNote(text) {
    els.pickerNote.textContent = text || "";
    els.pickerNote.hidden = !text;
  }

  /** Fills the adapter select for the chosen model, keeping `wanted` (a path) selected if it fits. */
  function renderAdapters(wanted) {
    const model = picker.selectedModel(els.modelSelect);
    const fitting = picker.fillAdapterSelect(els.adapterSelect, model, catalog, wanted);
    els.adapterSelect.disabled = fitting.length === 0 || modelBusy;
    setPickerNote(picker.adapterNote(model, fitting, catalog));
  }

  /**
   * Builds the model select from the catalog. With `follow` it then selects what is loaded;
   * without, it keeps the user's choice.
   */
  function renderModels(follow) {
    const previous = els.modelSelect.value;
    const previousAdapter = els.adapterSelect.value;
    // A model loaded by a path the catalog does not list still shows as what is loaded.
    const extra = [];
    const status = lastStatus;
    if (status && status.model && !catalog.models.some((model) => model.path === status.model)) {
      extra.push({ model: { id: status.model, name: fileName(status.model), backend: status.backend || "other", path: status.model,
                            available: true, external: true }, text: `${fileName(status.model)} ${t("picker.by_path")}` });
    }
    picker.fillModelSelect(els.modelSelect, catalog, extra);
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
      document.dispatchEvent(new CustomEvent("mt:catalog", { detail: catalog }));
    } catch (err) {
      setPickerNote(t("picker.list_unavailable", { reason: err.message }));
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
      const status = await postJson(url, body);
      settled();
      succeeded = true;
      setModelBusy(false);
      lastStatus = null; // follow what the server now has, even if it is what it had
      showStatus(status);
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

  function loadModel() {
    const model = picker.selectedModel(els.modelSelect);
    if (!model) {
      lastLoadError = t("model.choose");
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

  /** Enter sends, Shift+Enter breaks the line; Enter that confirms an IME candidate (Chinese, Japanese input) must not send. */
  function sendOnEnter(textarea, action) {
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        action();
      }
    });
  }

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  sendOnEnter(els.prompt, send);
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", newChat);
  els.loadModel.addEventListener("click", loadModel);
  els.unloadModel.addEventListener("click", unloadModel);
  els.modelSelect.addEventListener("change", () => renderAdapters(els.adapterSelect.value));

  // Text the page composed itself follows a language switch; model output never changes.
  document.addEventListener("mt:lang", () => {
    if (unreachableReason !== null) showUnreachable();
    else if (lastStatus) showStatus(lastStatus, false);
    if (catalogLoaded) renderModels(false);
    if (lastLoadError) showModelError(lastLoadError);
  });

  showView("chat");
  pollStatus();
  refreshModels();

  MT.catalog = () => catalog;
  MT.status = () => lastStatus;
  MT.views = { show: showView };
  MT.chat = { generationParams, sendOnEnter, openConversation, newChat };

  window.modelTest = {
    renderMessage,
    send,
    stop,
    newChat,
    regenerate,
    continueAnswer,
    loadModel,
    unloadModel,
    refreshModels,
    adaptersFor: picker.adaptersFor,
    conversation: () => conversation.map((message) => ({ ...message })),
    record: () => (record ? JSON.parse(JSON.stringify(record)) : null),
  };
})();
