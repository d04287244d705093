/* The conversations this browser has had, kept in localStorage: the list panel, export to a
 * JSON file and import from one. The chat (chat.js) owns the open conversation and saves it here
 * after every turn; this module never talks to the server.
 */
import { bind, t } from "./i18n.js";
import { newRequestId } from "./api.js";
import { byId, downloadBlob, fileName, makeButton, makeElement } from "./dom.js";
import { formatDate } from "./format.js";

const STORAGE_KEY = "model_test.conversations";
const FORMAT = "model_test.conversation";
const MAX_KEPT = 200;
const ROLES = ["system", "user", "assistant", "tool"];
// The second click on Delete must come within this long of the first.
const DELETE_ARM_MS = 3000;
const MAX_IMPORT_BYTES = 20 * 1024 * 1024;

const els = {
  list: byId("history-list"),
  empty: byId("history-empty"),
  error: byId("history-error"),
  importButton: byId("history-import"),
  importFile: byId("history-import-file"),
};

let currentId = null;
let locked = false; // while a turn runs, switching conversations would orphan its answer
let openHandler = () => {};

// ---------------------------------------------------------------- storage

function readAll() {
  try {
    const list = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
    return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages)) : [];
  } catch (_) {
    return []; // a store another version mangled is not worth breaking the page over
  }
}

function writeAll(list) {
  let kept = list.slice(0, MAX_KEPT);
  // localStorage holds a few MB: when it is full the oldest conversations make room.
  for (;;) {
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(kept));
      return true;
    } catch (_) {
      if (kept.length <= 1) {
        showError(t("history.storage_full"));
        return false;
      }
      kept = kept.slice(0, -1);
    }
  }
}

function byUpdated(a, b) {
  return String(b.updated || "").localeCompare(String(a.updated || ""));
}

function list() {
  return readAll().sort(byUpdated);
}

function get(id) {
  return readAll().find((c) => c.id === id) || null;
}

/** Stores a conversation (newest first) and redraws the list. */
function save(conversation) {
  const others = readAll().filter((c) => c.id !== conversation.id);
  writeAll([conversation, ...others].sort(byUpdated));
  currentId = conversation.id;
  render();
}

function remove(id) {
  writeAll(readAll().filter((c) => c.id !== id));
  render();
}

// ---------------------------------------------------------------- export and import

/** The file a conversation exports as: what was said, and everything needed to say it again. */
function exportData(conversation) {
  return {
    format: FORMAT,
    version: 1,
    title: conversation.title,
    created: conversation.created,
    updated: conversation.updated,
    model: conversation.model || null,
    system: conversation.system || "",
    params: conversation.params || {},
    messages: conversation.messages.map(messageData),
  };
}

/** A message as stored and exported: its role and text, and a call's id or an answer's calls. */
function messageData({ role, content, tool_calls: toolCalls, tool_call_id: toolCallId }) {
  const message = { role, content };
  if (Array.isArray(toolCalls) && toolCalls.length) message.tool_calls = toolCalls;
  if (typeof toolCallId === "string") message.tool_call_id = toolCallId;
  return message;
}

/** Whether `calls` are tool calls in OpenAI's shape, as an imported answer may carry them. */
function validCalls(calls) {
  return Array.isArray(calls) && calls.every((call) => call && typeof call.id === "string" && call.function
    && typeof call.function.name === "string" && typeof call.function.arguments === "string");
}

function exportFileName(conversation) {
  const day = String(conversation.updated || conversation.created || "").slice(0, 10) || "conversation";
  const slug = String(conversation.title || "")
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 40);
  return `conversation-${day}${slug ? `-${slug}` : ""}.json`;
}

function exportConversation(conversation) {
  const text = JSON.stringify(exportData(conversation), null, 2);
  downloadBlob(new Blob([text], { type: "application/json" }), exportFileName(conversation));
}

class ImportError extends Error {}

function titleOf(messages) {
  const first = messages.find((m) => m.role === "user");
  const text = first ? first.content.replace(/\s+/g, " ").trim() : "";
  return text.length > 80 ? `${text.slice(0, 79)}…` : text || t("history.untitled");
}

function checkNumber(params, name, low, high) {
  if (params[name] === undefined || params[name] === null) return;
  const value = params[name];
  if (typeof value !== "number" || !Number.isFinite(value) || value < low || value > high) {
    throw new ImportError(t("import.bad_param", { name, low, high }));
  }
}

/** Checks an exported conversation (or a bare {"messages": [...]}) and answers a record to store. */
function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new ImportError(t("import.not_json", { reason: err.message }));
  }
  if (!data || typeof data !== "object" || Array.isArray(data)) throw new ImportError(t("import.not_object"));
  if (data.format !== undefined && data.format !== FORMAT) throw new ImportError(t("import.bad_format", { format: String(data.format) }));
  if (!Array.isArray(data.messages) || data.messages.length === 0) throw new ImportError(t("import.no_messages"));
  let system = "";
  if (data.system !== undefined && data.system !== null) {
    if (typeof data.system !== "string") throw new ImportError(t("import.bad_system"));
    system = data.system;
  }
  const messages = [];
  data.messages.forEach((message, index) => {
    const n = index + 1;
    if (!message || typeof message !== "object") throw new ImportError(t("import.bad_message", { n }));
    if (!ROLES.includes(message.role)) throw new ImportError(t("import.bad_role", { n, role: String(message.role) }));
    if (typeof message.content !== "string") throw new ImportError(t("import.bad_content", { n }));
    // A leading system message (OpenAI style) is the conversation's system prompt here.
    if (message.role === "system") {
      if (messages.length) throw new ImportError(t("import.late_system", { n }));
      system = system || message.content;
      return;
    }
    if (message.tool_calls !== undefined && (message.role !== "assistant" || !validCalls(message.tool_calls))) {
      throw new ImportError(t("import.bad_tool_calls", { n }));
    }
    if (message.role === "tool" && typeof message.tool_call_id !== "string") throw new ImportError(t("import.bad_tool_message", { n }));
    messages.push(messageData(message));
  });
  if (!messages.length) throw new ImportError(t("import.no_messages"));
  const params = data.params === undefined || data.params === null ? {} : data.params;
  if (typeof params !== "object" || Array.isArray(params)) throw new ImportError(t("import.bad_params"));
  checkNumber(params, "temperature", 0, 2);
  checkNumber(params, "top_p", 0, 1);
  checkNumber(params, "max_new_tokens", 1, 1e6);
  const model = data.model && typeof data.model === "object" && !Array.isArray(data.model) ? data.model : null;
  const now = new Date().toISOString();
  const created = typeof data.created === "string" && !Number.isNaN(Date.parse(data.created)) ? data.created : now;
  return {
    id: newRequestId(), // a fresh id: importing the same file twice keeps both
    title: typeof data.title === "string" && data.title.trim() ? data.title.trim().slice(0, 200) : titleOf(messages),
    created,
    updated: now,
    model,
    system,
    params: {
      temperature: params.temperature,
      top_p: params.top_p,
      max_new_tokens: params.max_new_tokens,
    },
    messages,
  };
}

async function importFile(file) {
  showError("");
  if (!file) return;
  try {
    if (file.size > MAX_IMPORT_BYTES) throw new ImportError(t("import.too_large"));
    const record = parseImport(await file.text());
    save(record);
    openHandler(record);
  } catch (err) {
    showError(t("import.failed", { name: file.name, reason: err.message }));
  }
}

// ---------------------------------------------------------------- the list

function showError(text) {
  els.error.textContent = text || "";
  els.error.hidden = !text;
}

function modelLabel(model) {
  if (!model) return "";
  return [model.model_name || fileName(model.model), model.adapter && `+ ${fileName(model.adapter)}`]
    .filter(Boolean)
    .join(" ");
}

function renderItem(conversation) {
  const item = makeElement("li", "history-item");
  item.dataset.id = conversation.id;
  if (conversation.id === currentId) item.classList.add("current");
  const open = makeElement("button", "history-open");
  open.type = "button";
  open.disabled = locked;
  const title = makeElement("span", "history-title", conversation.title || t("history.untitled"));
  const meta = makeElement("span", "history-meta",
    [formatDate(conversation.updated || conversation.created), modelLabel(conversation.model)].filter(Boolean).join(" · "));
  open.title = conversation.title || "";
  open.append(title, meta);
  open.addEventListener("click", () => {
    const record = get(conversation.id);
    if (record && !locked) {
      showError("");
      currentId = record.id;
      render();
      openHandler(record);
    }
  });

  const exportButton = makeButton("history-export small", "history.export", () => {
    const record = get(conversation.id);
    if (record) exportConversation(record);
  });
  const deleteButton = makeButton("history-delete small danger", "history.delete");
  let armed = null;
  deleteButton.disabled = locked && conversation.id === currentId;
  deleteButton.addEventListener("click", () => {
    // Two clicks, no dialog: a modal confirm would block every tab's script and the tests.
    if (!armed) {
      bind(deleteButton, "history.delete_confirm");
      armed = setTimeout(() => {
        armed = null;
        bind(deleteButton, "history.delete");
      }, DELETE_ARM_MS);
      return;
    }
    clearTimeout(armed);
    const wasCurrent = conversation.id === currentId;
    remove(conversation.id);
    if (wasCurrent) document.dispatchEvent(new CustomEvent("mt:history-deleted-current"));
  });
  const actions = makeElement("div", "history-actions");
  actions.append(exportButton, deleteButton);
  item.append(open, actions);
  return item;
}

function render() {
  const all = list();
  els.list.replaceChildren(...all.map(renderItem));
  els.empty.hidden = all.length > 0;
}

function setCurrent(id) {
  currentId = id;
  render();
}

function setLocked(value) {
  locked = value;
  render();
}

els.importButton.addEventListener("click", () => els.importFile.click());
els.importFile.addEventListener("change", () => {
  const file = els.importFile.files[0];
  els.importFile.value = ""; // choosing the same file again still fires "change"
  importFile(file);
});
document.addEventListener("mt:lang", render);
// Another tab saved or deleted a conversation: show the same list here.
window.addEventListener("storage", (event) => {
  if (event.key === STORAGE_KEY) render();
});

render();

export {
  list,
  get,
  save,
  remove,
  setCurrent,
  setLocked,
  exportData,
  exportConversation,
  parseImport,
  importFile,
  titleOf,
};

export function onOpen(callback) {
  openHandler = callback;
}
