/* The three views (chat, compare, evaluate) as a tab strip; "mt:view" announces a switch. */
import { byId } from "./dom.js";

const VIEWS = ["chat", "compare", "evaluate"];

export function showView(name) {
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
