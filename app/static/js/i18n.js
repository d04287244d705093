/* The page's words in English and Simplified Chinese, and the language switch.
 *
 * Markup names its strings with data-i18n (text), data-i18n-placeholder, data-i18n-title and
 * data-i18n-aria-label; scripts call t("key", {vars}) or bind(el, key, vars) so the element
 * follows a later switch. Text the model or the server wrote is never looked up here.
 */
const STORAGE_KEY = "model_test.lang";
const LANGS = { en: "en", zh: "zh-CN" };

const STRINGS = {
  en: {
    "lang.switch": "中文",
    "lang.switch_title": "切换到中文",
    "top.no_model": "no model",
    "tab.chat": "Chat",
    "tab.compare": "Compare",
    "tab.evaluate": "Evaluate",
    "tabs.label": "Views",

    "history.title": "Conversations",
    "history.import": "Import",
    "history.import_title": "Open a conversation exported as JSON",
    "history.empty": "No saved conversations yet.",
    "history.untitled": "(untitled)",
    "history.export": "Export",
    "history.delete": "Delete",
    "history.delete_confirm": "Sure?",
    "history.storage_full": "This browser's storage is full: the conversation could not be saved.",
    "import.failed": "Could not import {name}: {reason}",
    "import.not_json": "it is not JSON ({reason})",
    "import.not_object": "expected a JSON object with a \"messages\" list",
    "import.bad_format": "it is a \"{format}\" file, not a model_test conversation",
    "import.no_messages": "it has no messages",
    "import.bad_system": "\"system\" must be a string",
    "import.bad_message": "message {n} is not an object",
    "import.bad_role": "message {n} has the role \"{role}\"; expected user, assistant or system",
    "import.bad_content": "message {n} has no text \"content\"",
    "import.late_system": "message {n} is a system message after the conversation began",
    "import.bad_params": "\"params\" must be an object",
    "import.bad_param": "\"{name}\" must be a number from {low} to {high}",
    "import.too_large": "the file is larger than 20 MB",

    "chat.label": "Conversation",
    "chat.empty": "Send a message to start testing the model.",
    "chat.placeholder": "Message the model — Enter sends, Shift+Enter adds a line",
    "chat.message": "Message",
    "chat.send": "Send",
    "chat.stop": "Stop",
    "chat.new": "New chat",
    "chat.unsent": "Not kept in the conversation: the model gave no answer",
    "chat.waiting": "waiting, position {position}",
    "chat.generating": "generating…",
    "chat.stopping": "stopping…",
    "chat.lost": "the connection to the server was lost before the answer finished",
    "chat.regenerate": "Regenerate",
    "chat.continue": "Continue",
    "chat.recorded_with": "Recorded with {model} ({backend}); a different model is being served now.",
    "role.user": "You",
    "role.assistant": "Model",
    "role.error": "Error",
    "prompt.toggle": "prompt",
    "prompt.toggle_title": "Show the exact prompt the model saw for this turn",
    "prompt.rendering": "rendering…",
    "prompt.caption": "{n} tokens, exactly as the model reads them",
    "prompt.failed": "could not render the prompt: {reason}",
    "fig.tokens": "{n} tokens",
    "fig.ttft": "TTFT {ms} ms",
    "fig.speed": "{tps} tokens/s",
    "fig.queued": "queued {ms} ms",

    "settings.label": "Settings",
    "model.title": "Model",
    "model.state": "State",
    "model.file": "File",
    "model.backend": "Backend",
    "model.adapter": "Adapter",
    "model.device": "Device",
    "model.queue_label": "Queue",
    "model.load": "Load",
    "model.unload": "Unload",
    "model.no_adapter": "none",
    "model.queue": "{running} running, {waiting} waiting",
    "model.status_unavailable": "status unavailable: {reason}",
    "model.server_unreachable": "server unreachable",
    "model.load_failed": "load failed: {reason}",
    "model.unload_failed": "unload failed: {reason}",
    "model.choose": "choose a model to load",
    "state.not_loaded": "not_loaded",
    "state.loading": "loading",
    "state.loaded": "loaded",
    "state.error": "error",
    "state.unloading": "unloading",
    "state.unreachable": "unreachable",
    "state.unknown": "unknown",
    "picker.model": "Model",
    "picker.adapter": "LoRA adapter",
    "picker.loading_list": "loading the model list…",
    "picker.no_adapter": "No adapter",
    "picker.no_models": "no models found",
    "picker.remote_code": "(remote code)",
    "picker.not_downloaded": "(not downloaded)",
    "picker.by_path": "(by path)",
    "picker.note_remote": "A remote server serves its adapters as models of their own.",
    "picker.note_gguf": "No GGUF LoRA here fits this model (scripts.convert_to_gguf --lora-only makes one).",
    "picker.note_none": "No adapter here was trained on this model.",
    "picker.list_unavailable": "model list unavailable: {reason}",
    "group.llamacpp": "GGUF · llama.cpp",
    "group.transformers": "Hugging Face · transformers",
    "group.openai": "Remote · OpenAI-compatible server",

    "gen.title": "Generation",
    "gen.temperature": "Temperature",
    "gen.top_p": "Top-p",
    "gen.max_tokens": "Max tokens",
    "gen.stream": "Stream tokens",
    "system.title": "System prompt",
    "system.placeholder": "Optional; leave empty to use none",

    "monitor.title": "System",
    "monitor.process_label": "Process",
    "monitor.memory_label": "Memory",
    "monitor.cpu_label": "CPU",
    "monitor.process": "RSS {rss} · CPU {cpu} · {threads} threads",
    "monitor.memory": "{used} / {total} ({pct})",
    "monitor.load": "load {load}",
    "monitor.cores": "{n} cores",
    "monitor.gpu": "GPU",
    "monitor.gpu_n": "GPU {n}",
    "monitor.no_gpu": "none",
    "monitor.loading": "Loading {name}… {s} s",
    "monitor.eval": "Evaluation: {done} / {total} rows ({state})",
    "monitor.unavailable": "system figures unavailable: {reason}",

    "slots.column": "Column {n}",
    "slots.model": "Model {n}",
    "slots.remove": "Remove",
    "slots.adapter_on": "adapter on",

    "compare.setup": "Columns",
    "compare.setup_loaded": "Columns · {n} loaded",
    "compare.add": "Add column",
    "compare.load": "Load columns",
    "compare.unload": "Unload columns",
    "compare.loading": "Loading the columns… {s} s",
    "compare.stale": "The pickers differ from the loaded columns: press Load columns to apply them.",
    "compare.empty": "Choose 2 to 4 models above and press Load columns; then one prompt goes to all of them at once.",
    "compare.multiturn": "multi-turn",
    "compare.multiturn_title": "Send each column its own earlier rounds with the next prompt",
    "compare.diff": "word diff",
    "compare.diff_title": "Highlight the words where each column differs from column 1",
    "compare.clear": "Clear",
    "compare.placeholder": "One prompt for every column — Enter sends",
    "compare.waiting": "waiting (shares weights)…",
    "compare.shares": "shares weights with column {n}",
    "compare.shares_mode": "shares weights with column {n} ({mode})",
    "compare.mode_merged": "adapter merged",
    "compare.mode_unmerged": "adapter unmerged",
    "compare.diff_too_long": "too long to compare word by word",
    "compare.adapter_on": "adapter {name} on",
    "compare.adapter_off": "adapter {name} off",

    "eval.title": "Batch evaluation",
    "eval.file": "Test set (.jsonl or .csv: prompt, optional system and reference)",
    "eval.choose_file": "Choose file",
    "eval.no_file_chosen": "No file chosen",
    "eval.name": "Name",
    "eval.name_placeholder": "optional",
    "eval.max_tokens": "Max new tokens",
    "eval.models": "Models",
    "eval.models_hint_none": "None chosen: the served model is evaluated.",
    "eval.models_hint_some": "Each model is loaded for the run, one after another.",
    "eval.add_model": "Add model",
    "eval.use_compare": "Use the compare columns",
    "eval.start": "Start",
    "eval.cancel": "Cancel",
    "eval.resume": "Resume",
    "eval.no_file": "Choose a test set file first.",
    "eval.show_running": "Show the running evaluation",
    "eval.progress": "{done} / {total}",
    "eval.progress_model": "{done} / {total} · {model}",
    "eval.lost": "lost the connection to the evaluation's progress",
    "eval.rows_done": "{done} / {total} rows",
    "eval.summary": "Summary",
    "eval.per_row": "Row by row",
    "eval.download": "Download",
    "eval.download_failed": "download failed: {reason}",
    "eval.model": "Model",
    "eval.rows": "Rows",
    "eval.bleu": "BLEU",
    "eval.rouge_l": "ROUGE-L",
    "eval.exact_match": "Exact match",
    "eval.latency": "Mean latency",
    "eval.tps": "Tokens/s",
    "eval.prompt": "Prompt",
    "eval.reference": "Reference",
    "eval.chart_title": "BLEU, ROUGE-L (×100) and exact match (%) per model",
    "eval.more_rows": "Show {n} more rows",
    "eval.history": "Earlier evaluations",
    "eval.refresh": "Refresh",
    "eval.list_empty": "No evaluations yet.",
    "evalstate.running": "running",
    "evalstate.done": "done",
    "evalstate.cancelled": "cancelled",
    "evalstate.error": "error",
    "evalstate.interrupted": "interrupted",

    "key.ask": "This server needs an API key:",
    "key.refused": "The API key was refused. API key:",
    "err.unreachable": "could not reach the server: {reason}",
    "err.generation_failed": "generation failed",
  },

  zh: {
    "lang.switch": "English",
    "lang.switch_title": "Switch to English",
    "top.no_model": "未加载模型",
    "tab.chat": "对话",
    "tab.compare": "对比",
    "tab.evaluate": "评测",
    "tabs.label": "视图",

    "history.title": "对话记录",
    "history.import": "导入",
    "history.import_title": "打开导出为 JSON 的对话",
    "history.empty": "还没有保存的对话。",
    "history.untitled": "（无标题）",
    "history.export": "导出",
    "history.delete": "删除",
    "history.delete_confirm": "确定？",
    "history.storage_full": "浏览器存储已满，无法保存此对话。",
    "import.failed": "无法导入 {name}：{reason}",
    "import.not_json": "不是 JSON（{reason}）",
    "import.not_object": "应为包含 \"messages\" 列表的 JSON 对象",
    "import.bad_format": "这是 \"{format}\" 文件，不是 model_test 对话",
    "import.no_messages": "文件中没有消息",
    "import.bad_system": "\"system\" 必须是字符串",
    "import.bad_message": "第 {n} 条消息不是对象",
    "import.bad_role": "第 {n} 条消息的角色是 \"{role}\"，应为 user、assistant 或 system",
    "import.bad_content": "第 {n} 条消息缺少文本 \"content\"",
    "import.late_system": "第 {n} 条是对话开始后的 system 消息",
    "import.bad_params": "\"params\" 必须是对象",
    "import.bad_param": "\"{name}\" 必须是 {low} 到 {high} 之间的数字",
    "import.too_large": "文件超过 20 MB",

    "chat.label": "对话",
    "chat.empty": "发送一条消息，开始测试模型。",
    "chat.placeholder": "给模型发消息 — Enter 发送，Shift+Enter 换行",
    "chat.message": "消息",
    "chat.send": "发送",
    "chat.stop": "停止",
    "chat.new": "新对话",
    "chat.unsent": "未计入对话：模型没有给出回答",
    "chat.waiting": "排队中，第 {position} 位",
    "chat.generating": "生成中…",
    "chat.stopping": "正在停止…",
    "chat.lost": "回答完成前与服务器的连接已断开",
    "chat.regenerate": "重新生成",
    "chat.continue": "继续",
    "chat.recorded_with": "此对话使用 {model}（{backend}）；当前服务的是另一个模型。",
    "role.user": "你",
    "role.assistant": "模型",
    "role.error": "错误",
    "prompt.toggle": "提示词",
    "prompt.toggle_title": "显示模型在这一轮看到的完整提示词",
    "prompt.rendering": "渲染中…",
    "prompt.caption": "{n} 个 token，与模型读取的完全一致",
    "prompt.failed": "无法渲染提示词：{reason}",
    "fig.tokens": "{n} 个 token",
    "fig.ttft": "首 token {ms} ms",
    "fig.speed": "{tps} token/秒",
    "fig.queued": "排队 {ms} ms",

    "settings.label": "设置",
    "model.title": "模型",
    "model.state": "状态",
    "model.file": "文件",
    "model.backend": "后端",
    "model.adapter": "适配器",
    "model.device": "设备",
    "model.queue_label": "队列",
    "model.load": "加载",
    "model.unload": "卸载",
    "model.no_adapter": "无",
    "model.queue": "{running} 个运行中，{waiting} 个等待中",
    "model.status_unavailable": "无法获取状态：{reason}",
    "model.server_unreachable": "无法连接服务器",
    "model.load_failed": "加载失败：{reason}",
    "model.unload_failed": "卸载失败：{reason}",
    "model.choose": "请选择要加载的模型",
    "state.not_loaded": "未加载",
    "state.loading": "加载中",
    "state.loaded": "已加载",
    "state.error": "出错",
    "state.unloading": "卸载中",
    "state.unreachable": "无法连接",
    "state.unknown": "未知",
    "picker.model": "模型",
    "picker.adapter": "LoRA 适配器",
    "picker.loading_list": "正在读取模型列表…",
    "picker.no_adapter": "不使用适配器",
    "picker.no_models": "没有找到模型",
    "picker.remote_code": "（远程代码）",
    "picker.not_downloaded": "（未下载）",
    "picker.by_path": "（按路径）",
    "picker.note_remote": "远程服务器把它的适配器作为独立模型提供。",
    "picker.note_gguf": "这里没有适合此模型的 GGUF LoRA（可用 scripts.convert_to_gguf --lora-only 生成）。",
    "picker.note_none": "这里没有基于此模型训练的适配器。",
    "picker.list_unavailable": "无法获取模型列表：{reason}",
    "group.llamacpp": "GGUF · llama.cpp",
    "group.transformers": "Hugging Face · transformers",
    "group.openai": "远程 · OpenAI 兼容服务器",

    "gen.title": "生成参数",
    "gen.temperature": "温度",
    "gen.top_p": "Top-p",
    "gen.max_tokens": "最大 token 数",
    "gen.stream": "流式输出",
    "system.title": "系统提示词",
    "system.placeholder": "可选；留空则不使用",

    "monitor.title": "系统",
    "monitor.process_label": "进程",
    "monitor.memory_label": "内存",
    "monitor.cpu_label": "CPU",
    "monitor.process": "常驻内存 {rss} · CPU {cpu} · {threads} 个线程",
    "monitor.memory": "{used} / {total}（{pct}）",
    "monitor.load": "负载 {load}",
    "monitor.cores": "{n} 核",
    "monitor.gpu": "GPU",
    "monitor.gpu_n": "GPU {n}",
    "monitor.no_gpu": "无",
    "monitor.loading": "正在加载 {name}… {s} 秒",
    "monitor.eval": "评测：{done} / {total} 行（{state}）",
    "monitor.unavailable": "无法获取系统信息：{reason}",

    "slots.column": "第 {n} 列",
    "slots.model": "模型 {n}",
    "slots.remove": "移除",
    "slots.adapter_on": "启用适配器",

    "compare.setup": "对比列",
    "compare.setup_loaded": "对比列 · 已加载 {n} 列",
    "compare.add": "添加一列",
    "compare.load": "加载各列",
    "compare.unload": "卸载各列",
    "compare.loading": "正在加载各列… {s} 秒",
    "compare.stale": "选择与已加载的列不同：点击“加载各列”使其生效。",
    "compare.empty": "在上方选择 2 到 4 个模型并点击“加载各列”，之后同一个提示词会同时发给所有列。",
    "compare.multiturn": "多轮",
    "compare.multiturn_title": "发送下一个提示词时附上每一列自己的历史轮次",
    "compare.diff": "逐词差异",
    "compare.diff_title": "高亮每一列与第 1 列不同的词",
    "compare.clear": "清空",
    "compare.placeholder": "同一个提示词发给每一列 — Enter 发送",
    "compare.waiting": "等待中（共享权重）…",
    "compare.shares": "与第 {n} 列共享权重",
    "compare.shares_mode": "与第 {n} 列共享权重（{mode}）",
    "compare.mode_merged": "适配器已合并",
    "compare.mode_unmerged": "适配器未合并",
    "compare.diff_too_long": "文本太长，无法逐词对比",
    "compare.adapter_on": "适配器 {name} 已启用",
    "compare.adapter_off": "适配器 {name} 已关闭",

    "eval.title": "批量评测",
    "eval.file": "测试集（.jsonl 或 .csv：prompt，可选 system 和 reference）",
    "eval.choose_file": "选择文件",
    "eval.no_file_chosen": "未选择文件",
    "eval.name": "名称",
    "eval.name_placeholder": "可选",
    "eval.max_tokens": "最大新 token 数",
    "eval.models": "模型",
    "eval.models_hint_none": "未选择：评测当前服务的模型。",
    "eval.models_hint_some": "评测时依次加载每个模型。",
    "eval.add_model": "添加模型",
    "eval.use_compare": "使用对比列",
    "eval.start": "开始",
    "eval.cancel": "取消",
    "eval.resume": "继续评测",
    "eval.no_file": "请先选择测试集文件。",
    "eval.show_running": "查看正在运行的评测",
    "eval.progress": "{done} / {total}",
    "eval.progress_model": "{done} / {total} · {model}",
    "eval.lost": "与评测进度的连接已断开",
    "eval.rows_done": "{done} / {total} 行",
    "eval.summary": "汇总",
    "eval.per_row": "逐行结果",
    "eval.download": "下载",
    "eval.download_failed": "下载失败：{reason}",
    "eval.model": "模型",
    "eval.rows": "行数",
    "eval.bleu": "BLEU",
    "eval.rouge_l": "ROUGE-L",
    "eval.exact_match": "完全匹配",
    "eval.latency": "平均延迟",
    "eval.tps": "token/秒",
    "eval.prompt": "提示词",
    "eval.reference": "参考答案",
    "eval.chart_title": "各模型的 BLEU、ROUGE-L（×100）和完全匹配率（%）",
    "eval.more_rows": "再显示 {n} 行",
    "eval.history": "历史评测",
    "eval.refresh": "刷新",
    "eval.list_empty": "还没有评测。",
    "evalstate.running": "运行中",
    "evalstate.done": "已完成",
    "evalstate.cancelled": "已取消",
    "evalstate.error": "出错",
    "evalstate.interrupted": "已中断",

    "key.ask": "此服务器需要 API key：",
    "key.refused": "API key 被拒绝。请重新输入 API key：",
    "err.unreachable": "无法连接服务器：{reason}",
    "err.generation_failed": "生成失败",
  },
};

const ATTRIBUTES = ["placeholder", "title", "aria-label"];

function initialLang() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved && STRINGS[saved]) return saved;
  const preferred = (navigator.languages && navigator.languages[0]) || navigator.language || "en";
  return /^zh/i.test(preferred) ? "zh" : "en";
}

let current = initialLang();

function has(key) {
  return key in STRINGS[current] || key in STRINGS.en;
}

/** The string for `key` in the current language, with {name} filled from `vars`. */
function t(key, vars) {
  const template = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  if (!vars) return template;
  return template.replace(/\{(\w+)\}/g, (whole, name) => (vars[name] === undefined || vars[name] === null ? whole : String(vars[name])));
}

function readVars(el, name) {
  const raw = el.getAttribute(name);
  if (!raw) return null;
  try {
    return JSON.parse(raw);
  } catch (_) {
    return null;
  }
}

/**
 * Sets an element's text (or an attribute) to `key` and remembers the key, so a language
 * switch rewrites it. `vars` must be plain data: they are stored on the element as JSON.
 */
function bind(el, key, vars = null, attribute = null) {
  const suffix = attribute ? `-${attribute}` : "";
  el.setAttribute(`data-i18n${suffix}`, key);
  if (vars) el.setAttribute(`data-i18n${suffix}-vars`, JSON.stringify(vars));
  else el.removeAttribute(`data-i18n${suffix}-vars`);
  if (attribute) el.setAttribute(attribute, t(key, vars));
  else el.textContent = t(key, vars);
}

/** Rewrites every bound string under `root` in the current language. */
function apply(root = document) {
  for (const el of root.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.getAttribute("data-i18n"), readVars(el, "data-i18n-vars"));
  }
  for (const attribute of ATTRIBUTES) {
    for (const el of root.querySelectorAll(`[data-i18n-${attribute}]`)) {
      el.setAttribute(attribute, t(el.getAttribute(`data-i18n-${attribute}`), readVars(el, `data-i18n-${attribute}-vars`)));
    }
  }
}

function applyLang() {
  document.documentElement.lang = LANGS[current];
  const toggle = document.getElementById("lang-toggle");
  if (toggle) toggle.lang = current === "en" ? "zh-CN" : "en"; // the button names the other language, in it
  apply();
}

function setLang(lang) {
  if (!STRINGS[lang] || lang === current) return;
  current = lang;
  try {
    localStorage.setItem(STORAGE_KEY, lang);
  } catch (_) {
    // storage off (private mode): the switch still holds for this page
  }
  applyLang();
  document.dispatchEvent(new CustomEvent("mt:lang", { detail: lang }));
}

const lang = () => current;

export { t, has, bind, apply, lang, setLang, STRINGS as strings };

const toggle = document.getElementById("lang-toggle");
if (toggle) toggle.addEventListener("click", () => setLang(current === "en" ? "zh" : "en"));
applyLang();
