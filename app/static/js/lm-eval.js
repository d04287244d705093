/* The eval panel's lm-evaluation-harness commands: one line each that runs standard benchmarks
 * against this server's OpenAI API, for the model it serves. lm-eval runs where the user runs
 * it, not inside the server: it weighs about 900 MB, its task files may run Python, and a long
 * benchmark would hold the model's slots (docs/api.md, "lm-evaluation-harness").
 */
import { bind } from "./i18n.js";
import { getJson, hasApiKey } from "./api.js";
import { byId } from "./dom.js";

const els = {
  tasks: byId("lm-eval-tasks"),
  mcBlock: byId("lm-eval-mc-block"),
  mcNone: byId("lm-eval-mc-none"),
  mc: byId("lm-eval-mc"),
  gen: byId("lm-eval-gen"),
  copyMc: byId("lm-eval-copy-mc"),
  copyGen: byId("lm-eval-copy-gen"),
  note: byId("lm-eval-note"),
};

let served = null; // {model, backend}: what /v1 serves now

/** Text for a POSIX shell's double quotes: nothing in it expands. */
function escaped(value) {
  return String(value).replace(/["\\`$]/g, "\\$&");
}

/**
 * The commands for `model` at `origin`. Multiple-choice tasks go to local-completions (echo and
 * logprobs; four prompts a request, four requests at once); the server's /tokenizer_info,
 * /tokenize and /detokenize give lm-eval the model's own tokenizer, so no local copy is named.
 * Generation goes to local-chat-completions through the chat template. With an API key the
 * key comes from the shell, never from the page.
 */
export function lmEvalCommands({ origin, model, tasks, keyed }) {
  const env = keyed ? "OPENAI_API_KEY=$MODEL_TEST_API_KEY " : "";
  const auth = keyed ? ",auth_token=$MODEL_TEST_API_KEY" : ""; // the tokenizer routes take the key from here
  const taskList = escaped(tasks.trim().replace(/\s+/g, "") || "hellaswag");
  const args = (route, extra) => `"${escaped(`model=${model},base_url=${origin}${route},num_concurrent=4`)}${extra}"`;
  return {
    mc: `${env}lm_eval --model local-completions --tasks "${taskList}" --batch_size 4 --model_args ${args("/v1/completions", auth)}`,
    gen: `${env}lm_eval --model local-chat-completions --apply_chat_template --tasks "${taskList}" ` +
      `--model_args ${args("/v1/chat/completions", "")}`,
  };
}

function render() {
  if (!served || !served.model) {
    els.mc.textContent = els.gen.textContent = "—";
    bind(els.note, "lmeval.no_model");
    return;
  }
  const keyed = hasApiKey();
  const commands = lmEvalCommands({ origin: window.location.origin, model: served.model, tasks: els.tasks.value, keyed });
  els.mc.textContent = commands.mc;
  els.gen.textContent = commands.gen;
  const local = served.backend !== "remote";
  els.mcBlock.hidden = !local;
  els.mcNone.hidden = local;
  bind(els.note, keyed ? "lmeval.note_keyed" : "lmeval.note", { model: served.model });
}

/** What /v1 serves: its first listed model (the loaded one, or the one the next request loads). */
export async function refresh(status) {
  try {
    const list = await getJson("/v1/models");
    served = { model: list.data.length ? list.data[0].id : null, backend: status ? status.backend : null };
  } catch (_) {
    served = null;
  }
  render();
}

function copy(pre, button) {
  const text = pre.textContent;
  const done = () => {
    bind(button, "lmeval.copied");
    setTimeout(() => bind(button, "lmeval.copy"), 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => selectText(pre));
  } else {
    selectText(pre); // http://<lan-ip> has no clipboard API: the text is selected for Ctrl+C
  }
}

function selectText(el) {
  const range = document.createRange();
  range.selectNodeContents(el);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

els.tasks.addEventListener("input", render);
els.copyMc.addEventListener("click", () => copy(els.mc, els.copyMc));
els.copyGen.addEventListener("click", () => copy(els.gen, els.copyGen));
document.addEventListener("mt:lang", render);
let seen = ""; // the status the commands were made for: the poll repeats it
document.addEventListener("mt:status", (event) => {
  const status = event.detail;
  const key = [status.state, status.backend, status.model, status.adapter].join("|");
  if (key !== seen) {
    seen = key;
    refresh(status);
  }
});
render();
