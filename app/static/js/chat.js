/* The chat: one conversation with the served model, its turns streamed in (or asked whole),
 * Stop, Regenerate and Continue, and its place in this browser's history.
 */
import { askWhole, newRequestId, stopWithGrace, streamTurn } from "./api.js";
import { byId, fileName, makeButton, makeElement, wireComposer } from "./dom.js";
import { makeFigures } from "./format.js";
import * as history from "./history.js";
import { bind, t } from "./i18n.js";
import { clearMessages, followingNewText, renderAssistant, renderError, renderMessage, renderNote, scrollToBottom } from "./messages.js";
import { lastStatus, modelReady } from "./model-panel.js";
import { generationSettings, restoreSettings, structuredSettings } from "./sampling.js";
import { TOP_ALTERNATIVES, probabilitiesOn, tokenView } from "./tokens.js";
import { callMessage, renderToolCalls } from "./tool-calls.js";
import { showView } from "./views.js";

const els = {
  messages: byId("messages"),
  composer: byId("composer"),
  prompt: byId("prompt"),
  send: byId("send"),
  stop: byId("stop"),
  newChat: byId("new-chat"),
  streamToggle: byId("stream-toggle"),
};

/** The committed conversation, sent whole with every turn, and the element of each message. */
const conversation = [];
const messageEls = [];
/** The stored record of the open conversation (history.js); null until its first answer. */
let record = null;
let activeTurn = null;

export const currentConversation = () => conversation.map((message) => ({ ...message }));
export const currentRecord = () => (record ? JSON.parse(JSON.stringify(record)) : null);

// ---------------------------------------------------------------- one turn

/**
 * One request to the model. "new" asks a new user message, "regenerate" asks the last one
 * again (its old answer already dropped), "continue" extends the last answer in place, "tool"
 * answers the tools' results the conversation now ends with.
 */
class Turn {
  constructor(kind, { userText = "", userEl = null, assistantEl = null, prefix = "" } = {}) {
    this.kind = kind;
    this.id = newRequestId();
    this.prefix = prefix;
    this.answer = "";
    this.ended = false;
    this.generation = null; // api.js's handle on the request, for Stop
    this.promptBody = null; // the conversation this turn sent, for its "prompt" view

    if (kind === "continue") {
      this.userMessage = null;
      this.el = assistantEl;
      this.el.classList.remove("empty");
      const oldFigures = this.el.querySelector(".figures");
      if (oldFigures) oldFigures.remove();
    } else if (kind === "tool") {
      this.userMessage = null;
      this.el = renderAssistant("", () => this.promptBody);
    } else {
      this.userMessage = { role: "user", content: userText };
      this.userEl = userEl || renderMessage("user", userText);
      this.userEl.classList.remove("unsent");
      this.userEl.removeAttribute("title");
      this.el = renderAssistant("", () => this.promptBody);
    }
    this.el.classList.add("streaming");
    const content = this.el.querySelector(".content");
    this.withProbabilities = probabilitiesOn();
    if (this.withProbabilities) {
      this.view = tokenView(content, (prefix, alternative) => branchAt(this.el, prefix, alternative), this.prefix);
    } else {
      this.answerNode = document.createTextNode("");
      content.append(this.answerNode);
    }
    this.noteEl = this.el.querySelector(".note");
    scrollToBottom(); // the user just sent: bring the new turn into view even if they had scrolled up
  }

  append(text, logprobs = null) {
    if (this.ended || (!text && !logprobs)) return;
    this.answer += text || "";
    this.setNote("");
    if (this.view) followingNewText(() => this.view.add(text, logprobs));
    // appendData keeps one text node growing instead of re-rendering the whole answer per token
    else if (text) followingNewText(() => this.answerNode.appendData(text));
  }

  setNote(key, vars) {
    if (key) bind(this.noteEl, key, vars);
    else this.noteEl.textContent = "";
    this.noteEl.hidden = !key;
  }

  /** Ends the turn once, whichever of done / error / stop timeout / dropped connection comes first. */
  finish({ finishReason, usage, timings, error, toolCalls = [] }) {
    if (this.ended) return;
    this.ended = true;
    this.el.classList.remove("streaming");
    this.setNote("");

    const continuing = this.kind === "continue";
    const calls = error ? [] : toolCalls;
    const answer = { role: "assistant", content: (continuing ? this.prefix : "") + this.answer };
    if (calls.length) answer.tool_calls = calls.map(callMessage);
    followingNewText(() => {
      // the calls and the figures go above the prompt view, next to the answer they belong to
      if (calls.length) this.el.querySelector(".msg-tools").before(renderToolCalls(calls, (results) => answerTools(answer, results)));
      const figures = makeFigures({ finishReason: error ? null : finishReason, usage, timings });
      if (figures) this.el.querySelector(".msg-tools").before(figures);
      if (error) {
        if (!this.answer && !continuing) this.el.remove();
        renderError(error);
      }
    });

    // A partial answer (stopped or cut off) stays in the history; a turn that produced
    // nothing is not kept, so the next request does not carry an unanswered message.
    const kept = continuing || this.answer || calls.length;
    if (kept) {
      conversation.push(...(this.userMessage ? [this.userMessage] : []), answer);
      messageEls.push(...(this.userMessage ? [this.userEl] : []), this.el);
    } else {
      if (this.userEl) {
        this.userEl.classList.add("unsent");
        this.userEl.title = t("chat.unsent");
      }
      if (!error) this.el.classList.add("empty");
    }

    if (activeTurn === this) activeTurn = null;
    if (kept) persist();
    setGenerating(false);
  }
}

// ---------------------------------------------------------------- asking

/** What an answer's "prompt" view renders: the conversation before the answer, and the system prompt unless blank. */
function promptViewBody(messages, system) {
  return { messages, ...(system && system.trim() ? { system } : {}) };
}

function canStart() {
  return !activeTurn && modelReady();
}

/** Sends `messages` for `turn`; `extra` joins the body (continue_final for a continuation). */
function startTurn(turn, messages, extra = {}) {
  activeTurn = turn;
  setGenerating(true);
  let structured;
  try {
    structured = structuredSettings();
  } catch (err) { // a JSON box that does not parse: say which, send nothing
    turn.finish({ finishReason: "error", error: err.message });
    return;
  }
  // Our own id lets Stop reach the server even before /api/streams or /api/chat answers.
  const body = { messages, request_id: turn.id, ...generationSettings(), ...structured, ...extra };
  if (turn.withProbabilities) body.logprobs = TOP_ALTERNATIVES;
  if (turn.kind !== "continue") {
    const offered = body.tools ? { tools: body.tools, tool_choice: body.tool_choice } : {};
    turn.promptBody = { ...promptViewBody(body.messages, body.system), ...offered };
  }
  const handlers = {
    queue: (data) => turn.setNote("chat.waiting", { position: data.position }),
    token: (text, data) => turn.append(text, data.logprobs),
    end: (outcome) => turn.finish(outcome),
  };
  if (els.streamToggle.checked) {
    turn.generation = streamTurn(body, handlers);
  } else {
    turn.setNote("chat.generating");
    turn.generation = askWhole(body, handlers);
  }
}

export function send() {
  if (!canStart()) return;
  const text = els.prompt.value;
  if (!text.trim()) return;
  els.prompt.value = "";
  const turn = new Turn("new", { userText: text });
  startTurn(turn, [...conversation, turn.userMessage]);
}

/** Drops the last answer and asks its question again. */
export function regenerate() {
  const n = conversation.length;
  if (!canStart() || n < 2 || conversation[n - 1].role !== "assistant" || conversation[n - 2].role !== "user") return;
  conversation.pop();
  messageEls.pop().remove();
  const question = conversation.pop();
  const userEl = messageEls.pop();
  const turn = new Turn("regenerate", { userText: question.content, userEl });
  startTurn(turn, [...conversation, turn.userMessage]);
}

/**
 * The tools' results for the calls of `answer` (the conversation's last message): they join the
 * conversation as tool messages and the model answers them. Answers false when it cannot now.
 */
function answerTools(answer, results) {
  if (!canStart() || conversation[conversation.length - 1] !== answer) return false;
  for (const result of results) {
    conversation.push({ role: "tool", tool_call_id: result.tool_call_id, content: result.content });
    messageEls.push(renderMessage("tool", result.content));
  }
  startTurn(new Turn("tool"), [...conversation]);
  return true;
}

/** Asks the model to go on from the end of its last answer; the new text joins that answer. */
export function continueAnswer() {
  const n = conversation.length;
  if (!canStart() || !n || conversation[n - 1].role !== "assistant") return;
  const last = conversation.pop();
  const turn = new Turn("continue", { assistantEl: messageEls.pop(), prefix: last.content });
  startTurn(turn, [...conversation, last], { continue_final: true });
}

/**
 * A branch of the conversation: the answer in `el` is cut where the user picked another token
 * (`prefix` is the text before it), that token goes in instead, and the model goes on writing
 * from there. The answer's later turns are dropped, as regenerating would drop them.
 */
function branchAt(el, prefix, alternative) {
  const index = messageEls.indexOf(el);
  if (!canStart() || index < 0 || conversation[index].role !== "assistant") return;
  for (const later of messageEls.splice(index)) later.remove();
  conversation.splice(index);
  const start = prefix + alternative;
  const before = conversation.slice();
  const { system } = generationSettings();
  const answerEl = renderAssistant(start, () => promptViewBody(before, system));
  const note = makeElement("div", "branch-note");
  bind(note, "probs.branched", { token: JSON.stringify(alternative) });
  answerEl.querySelector(".content").before(note);
  const turn = new Turn("continue", { assistantEl: answerEl, prefix: start });
  startTurn(turn, [...conversation, { role: "assistant", content: start }], { continue_final: true });
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

export function stop() {
  const turn = activeTurn;
  if (!turn || !stopWithGrace(turn.generation)) return;
  els.stop.disabled = true;
  turn.setNote("chat.stopping");
}

export function newChat() {
  if (activeTurn) return;
  conversation.length = 0;
  messageEls.length = 0;
  record = null;
  history.setCurrent(null);
  clearMessages();
  els.prompt.focus();
}

function setGenerating(generating) {
  els.prompt.disabled = generating;
  els.newChat.disabled = generating;
  els.stop.disabled = !generating;
  history.setLocked(generating);
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
  const status = lastStatus();
  if (!status) return null;
  return { model: status.model, model_name: status.model_name, backend: status.backend, adapter: status.adapter };
}

/** Saves the open conversation to this browser's history after each turn. */
function persist() {
  if (!conversation.length) return;
  const now = new Date().toISOString();
  if (!record) record = { id: newRequestId(), created: now, title: history.titleOf(conversation) };
  const { system = "", ...params } = generationSettings();
  Object.assign(record, {
    updated: now,
    model: modelInfo(),
    system,
    params,
    messages: conversation.map((message) => ({ ...message })),
  });
  history.save(record);
}

/** Shows a stored conversation, with the system prompt and sampling it was had with. */
export function openConversation(stored) {
  if (activeTurn) return;
  showView("chat");
  conversation.length = 0;
  messageEls.length = 0;
  clearMessages();
  record = { ...stored };
  restoreSettings({ params: stored.params || {}, system: stored.system || "" });

  const model = stored.model;
  const status = lastStatus();
  const served = status && status.model;
  if (model && model.model && served && model.model !== served) {
    renderNote("chat.recorded_with", { model: model.model_name || fileName(model.model), backend: model.backend || "?" });
  }
  for (const message of stored.messages) {
    const before = conversation.slice();
    const el = message.role === "assistant"
      ? renderAssistant(message.content, () => promptViewBody(before, stored.system))
      : renderMessage(message.role, message.content);
    if (message.tool_calls && message.tool_calls.length) el.querySelector(".msg-tools").before(renderToolCalls(message.tool_calls));
    conversation.push({ ...message });
    messageEls.push(el);
  }
  history.setCurrent(record.id);
  refreshAnswerActions();
  scrollToBottom();
}

// ---------------------------------------------------------------- wiring

history.onOpen(openConversation);
document.addEventListener("mt:history-deleted-current", () => {
  if (!activeTurn) newChat();
  else record = null; // the running turn saves it again as a new conversation
});
document.addEventListener("mt:model-busy", updateSendButton);

wireComposer(els.composer, els.prompt, send);
els.stop.addEventListener("click", stop);
els.newChat.addEventListener("click", newChat);
