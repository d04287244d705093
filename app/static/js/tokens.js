/* Seeing inside an answer: each answer token as a span coloured by the probability the model gave
 * it, and on hover, focus or tap the most likely alternatives at that place with their
 * percentages. Clicking an alternative asks the answer's owner to branch there (regenerate from
 * that point with that token). The probabilities come with the stream's token events when the
 * "probabilities" switch is on (`logprobs` in the request: the model's distribution before
 * sampling). All text goes in as text nodes.
 */
import { byId, makeElement } from "./dom.js";
import { bind, t } from "./i18n.js";

export const TOP_ALTERNATIVES = 5;
const toggle = byId("probs-toggle");

/** Whether generation requests should ask for probabilities (the sidebar switch). */
export const probabilitiesOn = () => toggle.checked;

function applySwitch() {
  document.body.classList.toggle("show-probs", toggle.checked);
}
toggle.addEventListener("change", applySwitch);
applySwitch();

// Each token span's probabilities, the answer text before it and its view (kept off the element:
// Element has read-only properties of its own, such as prefix).
const tokenData = new WeakMap();

const percent = (logprob) => {
  const p = Math.exp(logprob) * 100;
  return `${p >= 10 ? p.toFixed(0) : p >= 0.1 ? p.toFixed(1) : "<0.1"}%`;
};

/** A token's own text from its bytes; null for a piece of a character (it has no text alone). */
function textOf(entry) {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(new Uint8Array(entry.bytes));
  } catch (_) {
    return null;
  }
}

/**
 * The answer of one message or compare cell as token spans. ``add(text, entries)`` takes each
 * token event: its text (whole characters, as the stream assembled them) and its tokens'
 * probabilities; tokens that carried no text yet (a split character) join the next span.
 */
export class TokenView {
  /** `offset`: the answer's text before this view's first token (a continued answer's start). */
  constructor(content, onBranch = null, offset = "") {
    this.content = content;
    this.onBranch = onBranch; // (prefixText, alternativeText) => void
    this.pending = [];
    this.text = offset;
    content.classList.add("token-view");
  }

  add(text, entries) {
    if (entries && entries.length) this.pending.push(...entries);
    if (!text) return;
    const span = makeElement("span", "tok", text);
    const tokens = this.pending;
    this.pending = [];
    if (tokens.length) {
      // the least likely token of the span sets its colour: that is where the model hesitated
      const least = Math.min(...tokens.map((entry) => entry.logprob));
      span.dataset.p = String(Math.exp(least));
      span.style.setProperty("--p", String(Math.exp(least)));
      tokenData.set(span, { entries: tokens, before: this.text, view: this });
    }
    this.text += text;
    this.content.append(span);
  }
}

// ---------------------------------------------------------------- the alternatives box

const box = makeElement("div", "alternatives");
box.hidden = true;
box.setAttribute("role", "dialog");
document.body.append(box);
let shownFor = null;

function hide() {
  box.hidden = true;
  shownFor = null;
}

function show(span) {
  const { entries, before, view } = tokenData.get(span);
  const entry = entries[0];
  const title = makeElement("div", "alt-title");
  bind(title, "probs.title", { token: JSON.stringify(span.textContent), p: percent(entry.logprob) });
  const list = makeElement("ul", "alt-list");
  for (const alternative of entry.top_logprobs) {
    const item = makeElement("li");
    const text = textOf(alternative);
    const label = `${text === null ? "�" : JSON.stringify(text)}  ${percent(alternative.logprob)}`;
    const chosen = alternative.id === entry.id || (alternative.id === undefined && alternative.token === entry.token);
    const button = makeElement("button", `alt${chosen ? " chosen" : ""}`, label);
    button.type = "button";
    const bar = makeElement("span", "alt-bar");
    bar.style.setProperty("--p", String(Math.exp(alternative.logprob)));
    button.append(bar);
    // Branching needs whole characters and an owner that can continue from here.
    button.disabled = chosen || text === null || !view.onBranch;
    if (!button.disabled) {
      button.title = t("probs.branch");
      button.addEventListener("click", () => {
        hide();
        view.onBranch(before, text);
      });
    }
    item.append(button);
    list.append(item);
  }
  box.replaceChildren(title, list);
  box.hidden = false;
  const rect = span.getBoundingClientRect();
  box.style.left = `${Math.max(8, Math.min(window.innerWidth - box.offsetWidth - 8, rect.left + window.scrollX))}px`;
  box.style.top = `${rect.bottom + window.scrollY + 4}px`;
  shownFor = span;
}

/** Hover and focus show a token's alternatives; a tap (click) shows them on touch screens. */
function onPoint(event) {
  if (!document.body.classList.contains("show-probs")) return;
  const span = event.target.closest && event.target.closest(".tok");
  if (span && tokenData.has(span) && span !== shownFor) show(span);
}

document.addEventListener("mouseover", onPoint);
document.addEventListener("click", (event) => {
  if (box.contains(event.target)) return;
  const span = event.target.closest && event.target.closest(".tok");
  if (span && tokenData.has(span)) onPoint(event);
  else hide();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") hide();
});

/** Makes `content` show tokens; branches go to `onBranch` with the text before the token. */
export function tokenView(content, onBranch, offset = "") {
  return new TokenView(content, onBranch, offset);
}
