/* Building the page's elements. Everything the model or the server says goes in as text nodes,
 * never as HTML: a fine-tune under test may well emit markup.
 */
import { bind } from "./i18n.js";

export const byId = (id) => document.getElementById(id);

export function makeElement(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined && text !== null) el.textContent = text;
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element (the charts) with its attributes and, like makeElement, its text as a text node. */
export function makeSvg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

export function makeButton(className, key, onClick) {
  const button = makeElement("button", className);
  button.type = "button";
  if (key) bind(button, key);
  if (onClick) button.addEventListener("click", onClick);
  return button;
}

export function fileName(path) {
  if (!path) return "—";
  return String(path).split(/[\\/]/).pop();
}

/** Saves a Blob as a download; the object URL lives until the browser has taken the file. */
export function downloadBlob(blob, name) {
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

/**
 * A composer: submitting its form sends, and so does Enter in its textarea, while Shift+Enter
 * breaks the line and Enter that confirms an IME candidate (Chinese, Japanese input) does not send.
 */
export function wireComposer(form, textarea, send) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      send();
    }
  });
}
