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


/** Enter sends, Shift+Enter breaks the line; Enter that confirms an IME candidate (Chinese, Japanese input) must not send. */
export function sendOnEnter(textarea, action) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      action();
    }
  });
}
