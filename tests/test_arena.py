"""Which model is better: blind A/B votes and their ratings, and a judge model in evals. The
rating maths against hand-computed examples; the votes and verdicts through the real API on the
real default model; durability of what was committed."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest

from app import create_app
from app.services.arena.ratings import Game, bradley_terry, elo, leaderboard, pair_table, wilson_interval
from app.services.evals.judge import combined, judge_summary, parse_pairwise, parse_rating
from app.services.records.arena_store import ArenaStore, Judgment
from config.settings import PROJECT_ROOT, RemoteSettings
from tests.support.servers import free_port
from tests.support.settings import make_settings

GGUF_ID = "smollm2-135m-instruct-q4_1"
HF_ID = "smollm2-135m-instruct"


# -- the maths, by hand ---------------------------------------------------------------------------

def test_two_models_bradley_terry_is_the_win_ratio():
    """A beat B 3 times in 4: the likelihood is maximal at s_A / s_B = 3, so the gap is 400 log10 3."""
    games = [Game("A", "B", 1.0)] * 3 + [Game("A", "B", 0.0)]
    strength = bradley_terry(games, ["A", "B"], prior_games=0)
    assert strength["A"] / strength["B"] == pytest.approx(3.0, rel=1e-9)
    assert strength["A"] * strength["B"] == pytest.approx(1.0)  # normalised to a geometric mean of 1
    assert elo(strength["A"]) - elo(strength["B"]) == pytest.approx(400 * math.log10(3), rel=1e-9)  # 190.85 points


def test_three_models_meet_the_likelihood_equations():
    """A 2-1 B, B 2-1 C, A 2-1 C, and a tie A-C. At the maximum each model's expected score,
    sum over games of s_i / (s_i + s_j), equals its actual score (ties half); checked by hand on the fit."""
    games = ([Game("A", "B", 1.0)] * 2 + [Game("A", "B", 0.0)] + [Game("B", "C", 1.0)] * 2 + [Game("B", "C", 0.0)]
             + [Game("A", "C", 1.0)] * 2 + [Game("A", "C", 0.0)] + [Game("A", "C", 0.5)])
    s = bradley_terry(games, ["A", "B", "C"], prior_games=0, iterations=5000, tolerance=1e-14)
    actual = {"A": 4.5, "B": 3.0, "C": 2.5}
    for model, score in actual.items():
        expected = sum(s[g.a] / (s[g.a] + s[g.b]) if g.a == model else s[g.b] / (s[g.a] + s[g.b])
                       for g in games if model in (g.a, g.b))
        assert expected == pytest.approx(score, abs=1e-8)
    assert s["A"] > s["B"] > s["C"]


def test_wilson_interval_and_pair_table():
    low, high = wilson_interval(3, 4)  # the textbook example: 3 of 4, 95 %
    assert (round(low, 3), round(high, 3)) == (0.301, 0.954)
    table = pair_table([Game("B", "A", 0.0), Game("A", "B", 1.0), Game("A", "B", 0.5), Game("B", "A", 1.0)])
    assert [row.model_dump() for row in table] == [{
        "model_a": "A", "model_b": "B", "wins_a": 2, "wins_b": 1, "ties": 1, "games": 4,
        "win_share_a": 0.625, "ci95": [round(wilson_interval(2.5, 4)[0], 4), round(wilson_interval(2.5, 4)[1], 4)]}]


def test_leaderboard_orders_by_rating_with_intervals_around_it():
    games = [Game("strong", "weak", 1.0)] * 8 + [Game("strong", "weak", 0.0)] * 2
    board = leaderboard(games, rounds=100)
    assert [row.model for row in board] == ["strong", "weak"]
    for row in board:
        low, high = row.ci95
        assert low <= row.rating <= high and row.games == 10


def test_judge_verdicts_are_read_only_in_their_format():
    assert parse_pairwise("Both are fine, but A is clearer. [[A]]") == "A"
    assert parse_pairwise("[[C]]") == "tie" and parse_pairwise("[[ B ]]") == "B"
    assert parse_pairwise("I think A is better.") == "unparsable"  # not guessed
    assert parse_pairwise("[[A]] no wait [[B]]") == "unparsable"
    assert parse_rating("Rating: [[7]]") == "7" and parse_rating("[[11]]") == "unparsable" and parse_rating("7/10") == "unparsable"
    assert combined("A", "A") == "A" and combined("A", "B") == "tie" and combined("unparsable", "A") == "unparsable"


def test_judge_summary_counts_add_up():
    verdicts = [("ab", "A"), ("ba", "B"),  # row 0: m1 wins in both orders
                ("ab", "A"), ("ba", "A")]  # row 1: each order prefers the first position: a tie
    def judgment(kind, row, model_a, model_b, order, verdict):
        return Judgment(eval_id="e", row_index=row, kind=kind, model_a=model_a, model_b=model_b, order_shown=order,
                        verdict=verdict, reason="", judge="j", created="")

    judgments = [judgment("pairwise", i // 2, "m1", "m2", order, verdict) for i, (order, verdict) in enumerate(verdicts)]
    judgments += [judgment("pairwise", 2, "m1", "m2", "ab", "unparsable"), judgment("pairwise", 2, "m1", "m2", "ba", "B"),
                  judgment("single", 0, "m1", "", "", "8"), judgment("single", 1, "m1", "", "", "unparsable")]
    summary = judge_summary(judgments, ["m1", "m2"])
    m1, m2 = summary["m1"].model_dump(), summary["m2"].model_dump()
    assert (m1["judge_wins"], m1["judge_losses"], m1["judge_ties"], m1["judge_unparsable"]) == (1, 0, 1, 1)
    assert (m2["judge_wins"], m2["judge_losses"], m2["judge_ties"], m2["judge_unparsable"]) == (0, 1, 1, 1)
    for counts in (m1, m2):
        assert counts["judge_pairs"] == 3 == sum(counts[k] for k in ("judge_wins", "judge_losses", "judge_ties",
                                                                       "judge_unparsable", "judge_errors"))
    assert (m1["judge_rating"], m1["judge_rated"], m1["judge_rating_unparsable"]) == (8.0, 1, 1)


# -- votes through the API ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arena_app(tmp_path_factory, default_gguf, default_hf_checkpoint):
    root = tmp_path_factory.mktemp("arena")
    app = create_app(make_settings(root, results_dir=root / "results"))
    yield app
    app.extensions["compare_slots"].clear()


def test_a_blind_comparison_hides_the_models_until_the_vote(arena_app):
    client = arena_app.test_client()
    assert client.post("/api/arena/comparisons", json={"prompt": "Hi"}).status_code == 400  # no columns loaded
    client.post("/api/compare/slots", json={"slots": [{"model": GGUF_ID}, {"model": HF_ID}]})
    made = client.post("/api/arena/comparisons", json={"prompt": "Name a fruit.", "max_new_tokens": 8, "temperature": 0})
    assert made.status_code == 201
    shown = made.get_json()
    assert [a["position"] for a in shown["answers"]] == ["A", "B"] and all(a["text"] for a in shown["answers"])
    assert GGUF_ID not in json.dumps(shown) and HF_ID not in json.dumps(shown)
    assert client.get(f"/api/arena/comparisons/{shown['id']}").get_json()["mapping"] is None
    before = client.get("/api/arena/ratings").get_json()["votes"]
    voted = client.post(f"/api/arena/comparisons/{shown['id']}/vote", json={"vote": "B"})
    assert voted.status_code == 200
    result = voted.get_json()
    assert set(result["mapping"].values()) == {GGUF_ID, HF_ID}
    assert result["ratings"]["votes"] == before + 1
    winner = result["mapping"]["B"]
    assert result["ratings"]["leaderboard"][0]["model"] == winner or result["ratings"]["votes"] > 1
    assert client.get(f"/api/arena/comparisons/{shown['id']}").get_json()["mapping"] == result["mapping"]


def test_bad_votes_are_clear_errors(arena_app):
    client = arena_app.test_client()
    unknown = client.post("/api/arena/comparisons/0123456789abcdef01234567/vote", json={"vote": "A"})
    assert unknown.status_code == 404 and unknown.get_json()["type"] == "not_found"
    client.post("/api/compare/slots", json={"slots": [{"model": GGUF_ID}, {"model": HF_ID}]})
    made = client.post("/api/arena/comparisons", json={"prompt": "Say yes.", "max_new_tokens": 4}).get_json()
    wrong = client.post(f"/api/arena/comparisons/{made['id']}/vote", json={"vote": "C"})
    assert wrong.status_code == 400 and wrong.get_json()["field"] == "vote"
    assert client.post(f"/api/arena/comparisons/{made['id']}/vote", json={"vote": "tie"}).status_code == 200
    again = client.post(f"/api/arena/comparisons/{made['id']}/vote", json={"vote": "A"})
    assert again.status_code == 409 and again.get_json()["type"] == "already_voted"
    csv_export = client.get("/api/arena/export?format=csv").get_data(as_text=True)
    assert made["id"] in csv_export and "tie" in csv_export
    assert json.loads(client.get("/api/arena/export?format=json").get_data(as_text=True))["ratings"]["votes"] >= 1


def test_votes_survive_a_restart(arena_app, tmp_path):
    results = arena_app.config["SETTINGS"].results_dir
    votes = arena_app.test_client().get("/api/arena/ratings").get_json()["votes"]
    again = create_app(make_settings(tmp_path, results_dir=results))
    assert again.test_client().get("/api/arena/ratings").get_json()["votes"] == votes


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from app.services.records.arena_store import ArenaStore, Turn
    store = ArenaStore(Path(sys.argv[1]))
    for i in range(100000):
        store.add_comparison(f"c{i:06d}", "compare", [Turn(role="user", content="x" * 2000)], {}, {"A": "a" * 4000, "B": "b"},
                             {"A": "m1", "B": "m2"})
        store.record_vote(f"c{i:06d}", "A")
        print(i, flush=True)
""")


def test_a_kill_mid_write_loses_nothing_committed(tmp_path):
    """Each comparison and its vote are committed before the writer says so; a kill -9 at any
    moment keeps every one it said, and the database opens clean."""
    path = tmp_path / "arena.sqlite3"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    said = -1
    deadline = time.monotonic() + 60
    while said < 40 and time.monotonic() < deadline:
        said = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    voted = ArenaStore(path).voted()
    assert len(voted) >= said + 1  # everything acknowledged is there (perhaps one more, committed unsaid)
    assert all(c.vote == "A" and c.answers["A"] == "a" * 4000 for c in voted)


def test_an_eval_can_be_walked_as_blind_pairs_and_judged(arena_app):
    """The judge is the default model: it runs in both orders, its verdicts are parsed (a small
    model mostly writes none it can read: recorded as unparsable, not guessed), and the counts add up."""
    client = arena_app.test_client()
    rows = [{"prompt": "What is 2+2?", "reference": "4"}, {"prompt": "Name a colour.", "reference": "Blue."}]
    body = {"test_set": "\n".join(json.dumps(r) for r in rows), "filename": "set.jsonl", "max_new_tokens": 8,
            "models": [{"model": GGUF_ID}, {"model": HF_ID}], "judge": {"model": GGUF_ID, "mode": "both", "max_new_tokens": 24}}
    started = client.post("/api/eval", json=body)
    assert started.status_code == 202, started.get_json()
    eval_id = started.get_json()["id"]
    arena_app.extensions["eval_service"].wait(eval_id)
    report = client.get(f"/api/evals/{eval_id}").get_json()
    assert report["state"] == "done" and report["judge"]["mode"] == "both" and report["judge_error"] is None
    for row in report["rows"]:
        (pair,) = [v for v in row["judge"] if v["kind"] == "pairwise"]
        assert pair["ab"] is not None and pair["ba"] is not None and pair["reason_ab"] and pair["reason_ba"]
        assert len([v for v in row["judge"] if v["kind"] == "single"]) == 2
    for model in report["summary"]:
        assert model["judge_pairs"] == 2 == sum(model[k] for k in ("judge_wins", "judge_losses", "judge_ties",
                                                                     "judge_unparsable", "judge_errors"))
        assert model["judge_rated"] + model["judge_rating_unparsable"] + model["judge_rating_errors"] == 2
    assert all(answer["output"] for row in report["rows"] for answer in row["outputs"].values())

    pair = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 1})
    assert pair.status_code == 201
    texts = {a["text"] for a in pair.get_json()["answers"]}
    assert texts == {answer["output"] for answer in report["rows"][1]["outputs"].values()}
    revealed = client.post(f"/api/arena/comparisons/{pair.get_json()['id']}/vote", json={"vote": "both_bad"}).get_json()
    assert set(revealed["mapping"].values()) == {GGUF_ID, HF_ID}
    bad_row = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 9})
    assert bad_row.status_code == 400 and bad_row.get_json()["field"] == "row"


class GarbageJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose model answers, but never in a verdict format."""

    def log_message(self, *args):
        pass

    def _json(self, data: dict):
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": "judge", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in ({"choices": [{"index": 0, "delta": {"content": "Both answers have merit."}, "finish_reason": None}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.mark.parametrize("judge_server", ["down", "garbage"])
def test_a_judge_that_is_down_or_talks_nonsense_leaves_the_eval_intact(tmp_path, default_gguf, judge_server):
    server = None
    if judge_server == "garbage":
        server = ThreadingHTTPServer(("127.0.0.1", 0), GarbageJudge)
        Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/v1"
    else:
        url = f"http://127.0.0.1:{free_port()}/v1"
    try:
        app = create_app(make_settings(tmp_path, results_dir=tmp_path / "results",
                                       judge_endpoint=RemoteSettings(base_url=url, model="judge", connect_timeout_s=2)))
        client = app.test_client()
        body = {"test_set": json.dumps({"prompt": "Name a colour.", "reference": "Blue."}), "filename": "set.jsonl",
                "max_new_tokens": 6, "models": [{"model": GGUF_ID}, {"model": GGUF_ID, "backend": "llamacpp"}],
                "judge": {"endpoint": True, "mode": "both"}}
        started = client.post("/api/eval", json=body)
        assert started.status_code == 202, started.get_json()
        app.extensions["eval_service"].wait(started.get_json()["id"])
        report = client.get(f"/api/evals/{started.get_json()['id']}").get_json()
        assert report["state"] == "done" and all(answer["output"] for answer in report["rows"][0]["outputs"].values())
        assert "api_key" not in json.dumps(report["judge"])
        if judge_server == "down":
            assert "could not connect" in report["judge_error"]
        else:
            assert report["judge_error"] is None
            verdicts = report["rows"][0]["judge"]
            assert {v["verdict"] for v in verdicts} == {"unparsable"}
            assert all(v.get("reason_ab", v.get("reason")) == "Both answers have merit." for v in verdicts)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
