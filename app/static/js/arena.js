/* Blind A/B votes. In Compare, a blind round sends the prompt to every column on the server,
 * which answers with the texts shuffled under the letters A, B, ... and keeps the models to
 * itself until the vote; the vote reveals them. The Evaluate view walks a finished eval's rows
 * the same way. The ratings every vote feeds (Bradley-Terry on the Elo scale, and per pair
 * wins, losses and ties) show as a table and a chart, with CSV and JSON exports.
 */
import { apiFetch, describeFailure, postJson, requestJson } from "./api.js";
import { byId, downloadBlob, makeButton, makeElement, makeSvg } from "./dom.js";
import { bind, t } from "./i18n.js";

const els = {
  ratings: byId("arena-ratings"),
  ratingsTable: byId("arena-ratings-table"),
  ratingsChart: byId("arena-ratings-chart"),
  pairsTable: byId("arena-pairs-table"),
  ratingsNote: byId("arena-ratings-note"),
  exportCsv: byId("arena-export-csv"),
  exportJson: byId("arena-export-json"),
};

// ---------------------------------------------------------------- one blind comparison

/**
 * Shows a comparison's answers under their letters, with the vote buttons; the vote reveals the
 * models in place and refreshes the ratings. `onVoted(result)` hears of it.
 */
export function renderComparison(container, comparison, onVoted = null) {
  const answers = makeElement("div", "blind-answers");
  const cells = new Map();
  for (const answer of comparison.answers) {
    const cell = makeElement("div", "blind-answer");
    cell.dataset.position = answer.position;
    const head = makeElement("div", "blind-head", t("arena.answer", { position: answer.position }));
    const reveal = makeElement("div", "blind-reveal");
    reveal.hidden = true;
    cell.append(head, makeElement("div", "content", answer.text), reveal);
    answers.append(cell);
    cells.set(answer.position, reveal);
  }
  const votes = makeElement("div", "blind-votes button-row");
  const choices = [...comparison.answers.map((a) => [a.position, "arena.better", { position: a.position }]),
                   ["tie", "arena.tie", null], ["both_bad", "arena.both_bad", null]];
  const buttons = choices.map(([vote, key, vars]) => {
    const button = makeButton(`small vote vote-${vote}`, null, async () => {
      for (const other of buttons) other.disabled = true;
      try {
        const result = await postJson(`/api/arena/comparisons/${encodeURIComponent(comparison.id)}/vote`,
          { vote, vote_token: comparison.vote_token });
        for (const [position, reveal] of cells) {
          reveal.textContent = result.mapping[position] || "?";
          reveal.hidden = false;
        }
        button.classList.add("chosen");
        renderRatings(result.ratings);
        if (onVoted) onVoted(result);
      } catch (err) {
        for (const other of buttons) other.disabled = false;
        votes.append(makeElement("span", "model-error", err.message));
      }
    });
    bind(button, key, vars);
    return button;
  });
  votes.append(...buttons);
  container.append(answers, votes);
}

/** A blind round on the compare columns: the server answers the prompt on each, shuffled. */
export async function blindRound(container, body) {
  const waiting = makeElement("div", "note");
  bind(waiting, "arena.generating");
  container.append(waiting);
  try {
    const comparison = await postJson("/api/arena/comparisons", body);
    waiting.remove();
    renderComparison(container, comparison);
  } catch (err) {
    waiting.remove();
    container.append(makeElement("div", "cell-error", err.message));
  }
}

// ---------------------------------------------------------------- ratings

function row(cells, tag = "td") {
  const tr = makeElement("tr");
  for (const [text, cls] of cells) tr.append(makeElement(tag, cls || "", text));
  return tr;
}

/** Each model's rating as a dot on a line with its 95 % interval as whiskers. */
function renderChart(board) {
  els.ratingsChart.replaceChildren();
  if (!board.length) return;
  const values = board.flatMap((m) => [m.rating, ...(m.ci95 || []).filter((v) => typeof v === "number")]);
  const low = Math.min(...values) - 20;
  const high = Math.max(...values) + 20;
  const left = 170;
  const width = 520;
  const rowH = 26;
  const height = 24 + board.length * rowH;
  const x = (value) => left + ((value - low) / (high - low)) * (width - left - 16);
  const root = makeSvg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart arena-chart" });
  root.append(makeSvg("title", {}, t("arena.chart_title")));
  board.forEach((model, index) => {
    const y = 16 + index * rowH + rowH / 2;
    const [ciLow, ciHigh] = model.ci95 || [];
    root.append(makeSvg("text", { x: left - 8, y: y + 4, class: "chart-label", "text-anchor": "end" },
      model.model.length > 26 ? `${model.model.slice(0, 25)}…` : model.model));
    if (typeof ciLow === "number" && typeof ciHigh === "number") {
      root.append(makeSvg("line", { x1: x(ciLow), x2: x(ciHigh), y1: y, y2: y, class: "chart-whisker" }));
    }
    const dot = makeSvg("circle", { cx: x(model.rating), cy: y, r: 5, class: "chart-dot" });
    dot.append(makeSvg("title", {}, `${model.model}: ${model.rating}`));
    root.append(dot, makeSvg("text", { x: x(model.rating), y: y - 8, class: "chart-value", "text-anchor": "middle" }, String(model.rating)));
  });
  els.ratingsChart.append(root);
}

export function renderRatings(ratings) {
  const board = ratings.leaderboard || [];
  els.ratings.hidden = false;
  bind(els.ratingsNote, "arena.votes", { votes: ratings.votes, games: ratings.games });
  const head = makeElement("thead");
  head.append(row([[t("arena.model")], [t("arena.rating"), "num"], [t("arena.ci"), "num"], [t("arena.games"), "num"]], "th"));
  const body = makeElement("tbody");
  for (const model of board) {
    const [low, high] = model.ci95 || [];
    body.append(row([[model.model, "wrap"], [String(model.rating), "num"],
                     [low == null ? "—" : `${low} – ${high}`, "num"], [String(model.games), "num"]]));
  }
  els.ratingsTable.replaceChildren(head, body);
  const pairHead = makeElement("thead");
  pairHead.append(row([[t("arena.pair")], [t("arena.wlt"), "num"], [t("arena.share"), "num"]], "th"));
  const pairBody = makeElement("tbody");
  for (const pair of ratings.pairs || []) {
    const [low, high] = pair.ci95 || [];
    pairBody.append(row([[`${pair.model_a} · ${pair.model_b}`, "wrap"], [`${pair.wins_a} / ${pair.wins_b} / ${pair.ties}`, "num"],
                         [`${(pair.win_share_a * 100).toFixed(0)}% (${(low * 100).toFixed(0)}–${(high * 100).toFixed(0)}%)`, "num"]]));
  }
  els.pairsTable.replaceChildren(pairHead, pairBody);
  renderChart(board);
}

export async function refreshRatings() {
  try {
    renderRatings(await requestJson("/api/arena/ratings", { verbatim: true }));
  } catch (_) {
    // no ratings yet to show, or the server is away: the panel stays as it was
  }
}

async function exportVotes(format) {
  const response = await apiFetch(`/api/arena/export?format=${format}`);
  if (!response.ok) throw new Error(await describeFailure(response));
  downloadBlob(await response.blob(), `arena-votes.${format}`);
}

els.exportCsv.addEventListener("click", () => exportVotes("csv").catch((err) => alert(err.message)));
els.exportJson.addEventListener("click", () => exportVotes("json").catch((err) => alert(err.message)));

// ---------------------------------------------------------------- an eval's rows, blind

/** Walks a finished eval row by row: each row's answers of its first two models as a blind pair. */
export function walkEval(container, evalReport) {
  const labels = (evalReport.models || []).map((model) => model.label);
  container.replaceChildren();
  container.hidden = false;
  if (labels.length < 2) {
    container.append(makeElement("p", "muted", t("arena.needs_two")));
    return;
  }
  const rows = evalReport.rows || [];
  let index = 0;
  const show = async () => {
    container.replaceChildren();
    const row = rows[index];
    const title = makeElement("div", "blind-title");
    bind(title, "arena.row_of", { n: index + 1, total: rows.length });
    const prompt = makeElement("div", "round-prompt", row.prompt);
    container.append(title, prompt);
    try {
      const comparison = await postJson("/api/arena/comparisons/from_eval",
                                        { eval_id: evalReport.id, row: row.index, models: labels.slice(0, 2) });
      renderComparison(container, comparison, () => {
        if (index + 1 < rows.length) {
          const next = makeButton("small primary", "arena.next_row", () => {
            index += 1;
            show();
          });
          container.append(next);
        }
      });
    } catch (err) {
      container.append(makeElement("div", "cell-error", err.message));
    }
  };
  show();
}

document.addEventListener("mt:view", (event) => {
  if (event.detail === "compare") refreshRatings();
});
