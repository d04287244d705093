/* Model and adapter selects, filled from GET /api/models. The sidebar's picker, the compare
 * columns and the evaluation's model list all build theirs here, so they list the same models
 * in the same groups and offer an adapter only for the bases it was trained on.
 */
import { bind, t } from "./i18n.js";
import { fileName, makeButton, makeElement } from "./dom.js";
import { formatSize } from "./format.js";
import { getCatalog } from "./catalog.js";

// The model select's groups, in this order; a backend not named here gets a group of its own.
const BACKEND_GROUPS = [
  ["llamacpp", "group.llamacpp"],
  ["transformers", "group.transformers"],
  ["remote", "group.remote"],
];

/** The adapters that fit the model with this id (the server lists each adapter's bases). */
function adaptersFor(modelId, adapters) {
  if (!modelId || !Array.isArray(adapters)) return [];
  return adapters.filter((adapter) => Array.isArray(adapter.bases) && adapter.bases.includes(modelId));
}

/** "Qwen2ForCausalLM, chatml": the architecture and chat template family /api/models read. */
function familyText(model) {
  return [model.architecture, model.template].filter(Boolean).join(", ");
}

function modelOptionText(model) {
  const parts = [String(model.name || model.id)];
  const size = formatSize(model.size_bytes);
  if (size) parts.push(size);
  const family = familyText(model);
  if (family) parts.push(family);
  let text = parts.join(" · ");
  if (model.trust_remote_code) text += ` ${t("picker.remote_code")}`;
  if (!model.available) text += ` ${t("picker.not_downloaded")}`;
  return text;
}

/**
 * Fills a model select from the catalog: one group per backend, missing weights disabled.
 * `extra` are models to list beyond the catalog ({model, text}); each option keeps its
 * model object as `option.model`. Returns whether any model could be listed.
 */
function fillModelSelect(select, catalog, extra = []) {
  const groups = new Map();
  const groupFor = (backend) => {
    if (!groups.has(backend)) {
      const group = makeElement("optgroup");
      const known = BACKEND_GROUPS.find(([name]) => name === backend);
      group.label = known ? t(known[1]) : String(backend);
      groups.set(backend, group);
    }
    return groups.get(backend);
  };
  for (const [backend] of BACKEND_GROUPS) groupFor(backend); // the usual order, whatever the list's
  const addOption = (model, text) => {
    const option = makeElement("option", "", text);
    option.value = model.id;
    option.title = [model.path, model.kind && `(${model.kind})`].filter(Boolean).join(" ");
    option.disabled = !model.available;
    option.model = model;
    groupFor(model.backend).append(option);
  };
  for (const model of catalog.models) addOption(model, modelOptionText(model));
  for (const { model, text } of extra) addOption(model, text);

  const filled = Array.from(groups.values()).filter((group) => group.children.length > 0);
  if (filled.length) {
    select.replaceChildren(...filled);
    return true;
  }
  const empty = makeElement("option", "", t("picker.no_models"));
  empty.value = "";
  empty.disabled = true;
  select.replaceChildren(empty);
  return false;
}

function selectedModel(select) {
  const option = select.selectedOptions[0];
  return option && option.value ? option.model : null;
}

/** Fills an adapter select for `model`, keeping `wanted` (a path) selected if it fits; answers the fitting ones. */
function fillAdapterSelect(select, model, catalog, wanted) {
  // The server matches each adapter to its bases on one backend (PEFT folders to transformers
  // models, GGUF LoRA files to GGUF models), so `bases` alone says what fits this model.
  const fitting = model ? adaptersFor(model.id, catalog.adapters) : [];
  const none = makeElement("option", "", t("picker.no_adapter"));
  none.value = "";
  const options = [none];
  for (const adapter of fitting) {
    const text = adapter.rank != null ? `${adapter.name} · r${adapter.rank}` : String(adapter.name);
    const option = makeElement("option", "", text);
    option.value = adapter.path;
    option.title = [adapter.path, adapter.base_model_name_or_path && `base: ${adapter.base_model_name_or_path}`]
      .filter(Boolean)
      .join("\n");
    options.push(option);
  }
  select.replaceChildren(...options);
  select.value = fitting.some((adapter) => adapter.path === wanted) ? wanted : "";
  return fitting;
}

/** Why a model offers no adapter, when there are adapters at all; "" otherwise. */
function adapterNote(model, fitting, catalog) {
  if (!model) return "";
  if (model.backend === "remote") return t("picker.note_remote");
  if (!fitting.length && model.backend === "llamacpp" && catalog.adapters.length) return t("picker.note_gguf");
  if (!fitting.length && catalog.adapters.length) return t("picker.note_none");
  return "";
}

// ---------------------------------------------------------------- column specs

/**
 * A list of model cards, each a model, an optional adapter and "adapter on": the compare
 * columns and the models of an evaluation. `specs()` answers them in the server's slot shape.
 */
class SlotList {
  constructor(container, { min, max, cardKey, onChange }) {
    this.container = container;
    this.min = min;
    this.max = max;
    this.cardKey = cardKey; // "Column {n}" or "Model {n}"
    this.onChange = onChange || (() => {});
    this.cards = [];
    this.disabled = false;
    document.addEventListener("mt:catalog", () => this.refresh());
    document.addEventListener("mt:lang", () => this.refresh());
  }

  get catalog() {
    return getCatalog();
  }

  /** Each card as {model, backend, adapter, adapter_enabled}, the shape POST /api/compare/slots takes. */
  specs() {
    return this.cards.map((card) => {
      const model = selectedModel(card.model);
      return {
        model: model ? model.id : card.model.value || null,
        backend: model ? model.backend : undefined,
        adapter: card.adapter.value || null,
        adapter_enabled: card.enabled.checked,
      };
    });
  }

  /** The cards with a model, as POST /api/compare/slots and an evaluation's models take them. */
  requestSpecs() {
    return this.specs().filter((spec) => spec.model).map((spec) => {
      const body = { model: spec.model, adapter: spec.adapter, adapter_enabled: spec.adapter ? spec.adapter_enabled : true };
      if (spec.backend && spec.backend !== "other") body.backend = spec.backend;
      return body;
    });
  }

  setSpecs(specs) {
    this.cards.forEach((card) => card.el.remove());
    this.cards = [];
    for (const spec of specs.slice(0, this.max)) this.add(spec, false);
    this.refresh();
    this.onChange();
  }

  add(spec = {}, notify = true) {
    if (this.cards.length >= this.max) return;
    const el = makeElement("div", "slot-card");
    const title = makeElement("div", "slot-title");
    const name = makeElement("span", "slot-name");
    const remove = makeButton("slot-remove", null, () => this.remove(card));
    remove.textContent = "×";
    bind(remove, "slots.remove", null, "title");
    bind(remove, "slots.remove", null, "aria-label");
    title.append(name, remove);
    const modelLabel = makeElement("label", "slot-label");
    bind(modelLabel, "picker.model");
    const model = makeElement("select", "slot-model");
    const adapterLabel = makeElement("label", "slot-label");
    bind(adapterLabel, "picker.adapter");
    const adapter = makeElement("select", "slot-adapter");
    const enabledLabel = makeElement("label", "slot-enabled");
    const enabled = makeElement("input", "slot-enabled-box");
    enabled.type = "checkbox";
    enabled.checked = spec.adapter_enabled !== false;
    const enabledText = makeElement("span");
    bind(enabledText, "slots.adapter_on");
    enabledLabel.append(enabled, enabledText);
    const note = makeElement("p", "picker-note");
    note.hidden = true;
    el.append(title, modelLabel, model, adapterLabel, adapter, enabledLabel, note);

    const card = { el, name, remove, model, adapter, enabled, note, wantedModel: spec.model || "", wantedAdapter: spec.adapter || "" };
    // label-for needs ids; the cards come and go, so they are numbered once each
    SlotList.counter = (SlotList.counter || 0) + 1;
    model.id = `slot-model-${SlotList.counter}`;
    adapter.id = `slot-adapter-${SlotList.counter}`;
    modelLabel.htmlFor = model.id;
    adapterLabel.htmlFor = adapter.id;

    model.addEventListener("change", () => {
      card.wantedModel = model.value;
      this.renderAdapter(card);
      this.onChange();
    });
    adapter.addEventListener("change", () => {
      card.wantedAdapter = adapter.value;
      this.renderAdapter(card);
      this.onChange();
    });
    enabled.addEventListener("change", () => this.onChange());
    this.cards.push(card);
    this.container.append(el);
    this.renderCard(card);
    this.renumber();
    if (notify) this.onChange();
  }

  remove(card) {
    if (this.cards.length <= this.min) return;
    this.cards = this.cards.filter((c) => c !== card);
    card.el.remove();
    this.renumber();
    this.onChange();
  }

  renumber() {
    this.cards.forEach((card, index) => {
      bind(card.name, this.cardKey, { n: index + 1 });
      card.remove.hidden = this.cards.length <= this.min;
    });
  }

  renderCard(card) {
    const catalog = this.catalog;
    // A model asked for by path (say, a compare slot loaded from another tab) stays choosable.
    const extra = [];
    if (card.wantedModel && !catalog.models.some((m) => m.id === card.wantedModel || m.path === card.wantedModel)) {
      extra.push({ model: { id: card.wantedModel, name: card.wantedModel, backend: "other", path: card.wantedModel, available: true },
                   text: `${fileName(card.wantedModel)} ${t("picker.by_path")}` });
    }
    fillModelSelect(card.model, catalog, extra);
    const wanted = catalog.models.find((m) => m.path === card.wantedModel);
    const value = wanted ? wanted.id : card.wantedModel;
    const options = Array.from(card.model.options);
    if (options.some((o) => o.value === value && !o.disabled)) card.model.value = value;
    else {
      const first = options.find((o) => o.value && !o.disabled);
      if (first) card.model.value = first.value;
    }
    this.renderAdapter(card);
  }

  renderAdapter(card) {
    const catalog = this.catalog;
    const model = selectedModel(card.model);
    const fitting = fillAdapterSelect(card.adapter, model, catalog, card.wantedAdapter);
    card.adapter.disabled = this.disabled || fitting.length === 0;
    card.enabled.disabled = this.disabled;
    // "adapter on" means nothing without an adapter chosen
    card.enabled.parentElement.hidden = !card.adapter.value;
    const note = adapterNote(model, fitting, catalog);
    card.note.textContent = note;
    card.note.hidden = !note;
    card.model.disabled = this.disabled;
  }

  refresh() {
    for (const card of this.cards) this.renderCard(card);
    this.renumber();
  }

  setDisabled(disabled) {
    this.disabled = disabled;
    for (const card of this.cards) {
      this.renderAdapter(card);
      card.remove.disabled = disabled;
    }
  }
}

export { BACKEND_GROUPS, adaptersFor, modelOptionText, fillModelSelect, fillAdapterSelect, selectedModel, adapterNote, SlotList };
