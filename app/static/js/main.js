/* The page's entry point (the one <script type="module">): each module wires its own part of the
 * page when it is imported; this one starts the polling and leaves two handles on window for
 * the browser tests and for poking at the page from the console. No module reads them: modules
 * name their dependencies with imports.
 */
import * as chat from "./chat.js";
import * as compare from "./compare.js";
import { loadedSlots } from "./compare-slots.js";
import * as evaluate from "./evaluate.js";
import { strings, t } from "./i18n.js";
import { renderMessage } from "./messages.js";
import { loadModel, pollStatus, refreshModels, unloadModel } from "./model-panel.js";
import "./monitor.js";
import { adaptersFor } from "./picker.js";
import { showView } from "./views.js";

showView("chat");
pollStatus();
refreshModels();

window.modelTest = {
  renderMessage,
  send: chat.send,
  stop: chat.stop,
  newChat: chat.newChat,
  regenerate: chat.regenerate,
  continueAnswer: chat.continueAnswer,
  loadModel,
  unloadModel,
  refreshModels,
  adaptersFor,
  conversation: chat.currentConversation,
  record: chat.currentRecord,
  openConversation: chat.openConversation,
};
window.MT = Object.freeze({
  compare: { slots: loadedSlots, specs: compare.specs, diffWords: compare.diffWords },
  evaluate: { shown: evaluate.shown, openEval: evaluate.openEval },
  i18n: { t, strings },
});
