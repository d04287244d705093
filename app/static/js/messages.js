/* The conversation view: messages rendered as text (never HTML: a fine-tune under test may well
 * emit markup), the view following new text while the user is at the bottom, and each answer's
 * "prompt" view with the exact string the model saw.
 */
import { postJson } from "./api.js";
import { byId, makeButton, makeElement } from "./dom.js";
import { bind } from "./i18n.js";

// Within this distance of the bottom the view follows new text; further up, the user is reading.
const PINNED_SLACK_PX = 48;
const ROLE_KEYS = { user: "role.user", assistant: "role.assistant", tool: "role.tool", error: "role.error" };

const box = byId("messages");
const emptyHint = byId("empty-hint");

function isPinnedToBottom() {
  return box.scrollHeight - box.scrollTop - box.clientHeight <= PINNED_SLACK_PX;
}

export function scrollToBottom() {
  box.scrollTop = box.scrollHeight;
}

/** Runs a change to the conversation and keeps the newest text in view if it was in view. */
export function followingNewText(change) {
  const pinned = isPinnedToBottom();
  change();
  if (pinned) scrollToBottom();
}

/** Adds one message to the conversation view, its text inserted literally. */
export function renderMessage(role, text) {
  const el = makeElement("div", `msg ${role}`);
  const label = makeElement("div", "role");
  if (ROLE_KEYS[role]) bind(label, ROLE_KEYS[role]);
  else label.textContent = String(role);
  el.append(label, makeElement("div", "content", String(text)));
  emptyHint.hidden = true;
  followingNewText(() => box.append(el));
  return el;
}

export function renderError(text) {
  return renderMessage("error", text);
}

/** An assistant message with its note line and its "prompt" view (for the turn that asked it). */
export function renderAssistant(text, getPromptBody) {
  const el = renderMessage("assistant", text);
  const note = makeElement("div", "note");
  note.hidden = true;
  el.append(note, makePromptView(getPromptBody));
  return el;
}

export function renderNote(key, vars) {
  const note = makeElement("p", "chat-note");
  bind(note, key, vars);
  box.append(note);
}

export function clearMessages() {
  for (const el of Array.from(box.children)) {
    if (el !== emptyHint) el.remove();
  }
  emptyHint.hidden = false;
}

/**
 * A "prompt" toggle and the exact string the model saw for a turn: the server renders the
 * turn's conversation with the same template and tokenizer generation uses. Shown as text,
 * so special tokens such as <|im_start|> stay visible instead of being read as markup.
 */
function makePromptView(getBody) {
  const tools = makeElement("div", "msg-tools");
  const toggle = makeButton("prompt-toggle", "prompt.toggle");
  bind(toggle, "prompt.toggle_title", null, "title");
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
    bind(caption, "prompt.rendering");
    pre.textContent = "";
    try {
      const rendered = await postJson("/api/apply_template", body);
      pre.textContent = rendered.prompt;
      bind(caption, "prompt.caption", { n: rendered.token_count });
      loaded = true; // a failure is retried on the next open
    } catch (err) {
      bind(caption, "prompt.failed", { reason: err.message });
    }
  });
  return tools;
}
