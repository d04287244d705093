/* Tool calls an answer made, shown as cards: the function's name, its arguments pretty-printed,
 * and what is wrong with the call (a tool never offered, arguments that break its schema or are
 * no JSON at all) marked on the card. In the chat, each card has a box for the tool's result;
 * once every call of the answer has one, the conversation goes on with them. Everything the
 * model wrote goes in as text.
 */
import { makeButton, makeElement } from "./dom.js";
import { bind } from "./i18n.js";

/** The call as a conversation sends it back: OpenAI's {id, type, function: {name, arguments}}. */
export function callMessage(call) {
  return { id: call.id, type: "function", function: { name: call.function.name, arguments: call.function.arguments } };
}

/** The arguments pretty-printed, or null when they are no JSON. */
function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (_) {
    return null;
  }
}

function makeCard(call) {
  const card = makeElement("div", "tool-card");
  card.dataset.callId = call.id;
  const head = makeElement("div", "tool-head");
  const label = makeElement("span", "tool-label");
  bind(label, "tool.call");
  head.append(label, makeElement("code", "tool-name", call.function.name));
  const pretty = prettyArguments(call.function.arguments);
  const args = makeElement("pre", "tool-args", pretty ?? call.function.arguments);
  card.append(head, args);
  if (pretty === null || call.problem) {
    card.classList.add("invalid");
    const problem = makeElement("div", "tool-problem");
    if (call.problem) bind(problem, "tool.problem", { problem: call.problem });
    else bind(problem, "tool.bad_arguments");
    card.append(problem);
  }
  return card;
}

/**
 * A box for the tool's result and its Send button; `done(text)` hears the result once sent and
 * answers whether it was taken (a turn still running leaves the box open).
 */
function addResultBox(card, done) {
  const form = makeElement("form", "tool-result");
  const box = makeElement("textarea", "tool-result-text");
  box.rows = 2;
  bind(box, "tool.result_placeholder", null, "placeholder");
  bind(box, "tool.result_placeholder", null, "aria-label");
  const send = makeButton("tool-result-send small", "tool.send_result");
  send.type = "submit";
  form.append(box, send);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (send.disabled) return;
    if (!box.value.trim()) {
      box.focus();
      return;
    }
    box.readOnly = true;
    send.disabled = true;
    if (!done(box.value)) {
      box.readOnly = false;
      send.disabled = false;
    }
  });
  card.append(form);
}

/**
 * The cards for `calls`, side by side. With `onResults`, each card takes its tool's result;
 * when every call has one, `onResults([{tool_call_id, content}, ...])` (in the calls' order)
 * continues the conversation and answers whether it could. Answers the cards' element.
 */
export function renderToolCalls(calls, onResults = null) {
  const cards = makeElement("div", "tool-calls");
  const results = new Map();
  for (const call of calls) {
    const card = makeCard(call);
    if (onResults) {
      addResultBox(card, (text) => {
        results.set(call.id, text);
        if (results.size < calls.length) return true;
        const taken = onResults(calls.map((c) => ({ tool_call_id: c.id, content: results.get(c.id) })));
        if (!taken) results.delete(call.id);
        return taken;
      });
    }
    cards.append(card);
  }
  return cards;
}
