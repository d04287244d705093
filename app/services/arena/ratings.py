"""Ratings from pairwise votes: per pair, wins, losses and ties with a 95 % interval on the win
share; across models, a Bradley-Terry fit on the Elo scale with bootstrap intervals, as the
Chatbot Arena reports its leaderboard.

A vote between two answers is a win, a loss or a tie ("both bad" counts as a tie, as the arena
counts it). Bradley-Terry gives each model a strength s so that P(i beats j) = s_i / (s_i + s_j);
a tie counts as half a win each way. The fit is Hunter's MM iteration (2004), which converges to
the maximum-likelihood strengths whenever every model has at least one win and one loss in a
connected set of games; a small prior (half a tie against a virtual average opponent) keeps the
strengths finite when one model wins or loses everything. Ratings are
``ELO_BASE + 400 * log10(s / geometric mean(s))``, so a 100-point gap means the better model wins
64 % of the time.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from pydantic import Field

from app.services.core.shapes import Shape

ELO_BASE = 1000.0
Z95 = 1.959964
PRIOR_GAMES = 0.5  # half a tie against a virtual opponent of average strength, per model
BOOTSTRAP_ROUNDS = 200


@dataclass(frozen=True)
class Game:
    a: str
    b: str
    score_a: float  # 1 a won, 0 b won, 0.5 a tie


class RatingRow(Shape):
    model: str
    rating: float = Field(description="Bradley-Terry strength on the Elo scale (1000 = the average model).")
    games: int
    ci95: list[Optional[float]] = Field(description="The bootstrap 95 % interval of the rating; nulls with one game.")


class PairRecord(Shape):
    model_a: str
    model_b: str
    wins_a: int
    wins_b: int
    ties: int
    games: int
    win_share_a: float = Field(description="(wins_a + ties / 2) / games.")
    ci95: list[Optional[float]] = Field(description="Wilson 95 % interval of win_share_a.")


def wilson_interval(successes: float, trials: float) -> tuple[Optional[float], Optional[float]]:
    """The Wilson score interval of a proportion, at 95 %; ties count as half a success."""
    if trials <= 0:
        return None, None
    p = successes / trials
    denominator = 1 + Z95**2 / trials
    centre = (p + Z95**2 / (2 * trials)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pair_table(games: Iterable[Game]) -> list[PairRecord]:
    """Per unordered pair (named in alphabetical order): wins, losses, ties and the first model's
    win share (ties half) with its 95 % interval."""
    pairs: dict[tuple[str, str], list[float]] = {}
    for game in games:
        a, b, score = (game.a, game.b, game.score_a) if game.a <= game.b else (game.b, game.a, 1.0 - game.score_a)
        wins, losses, ties = pairs.setdefault((a, b), [0, 0, 0])
        if score == 1.0:
            pairs[(a, b)][0] += 1
        elif score == 0.0:
            pairs[(a, b)][1] += 1
        else:
            pairs[(a, b)][2] += 1
    table = []
    for (a, b), (wins, losses, ties) in sorted(pairs.items()):
        games_played = wins + losses + ties
        share = (wins + 0.5 * ties) / games_played
        low, high = wilson_interval(wins + 0.5 * ties, games_played)
        table.append(PairRecord(model_a=a, model_b=b, wins_a=wins, wins_b=losses, ties=ties, games=games_played,
                                win_share_a=round(share, 4), ci95=[round(low, 4), round(high, 4)]))
    return table


def bradley_terry(games: Sequence[Game], models: Sequence[str], iterations: int = 500, tolerance: float = 1e-10,
                  prior_games: float = PRIOR_GAMES) -> dict[str, float]:
    """Strengths by Hunter's MM update: s_i <- W_i / sum_j n_ij / (s_i + s_j), W_i the wins of i
    (ties half) and n_ij the games between i and j, each model also playing ``prior_games`` tied
    games against a fixed opponent of strength 1; normalised to a geometric mean of 1."""
    strength = {model: 1.0 for model in models}
    wins = {model: prior_games / 2 for model in models}
    meetings: dict[tuple[str, str], float] = {}
    for game in games:
        wins[game.a] += game.score_a
        wins[game.b] += 1.0 - game.score_a
        key = (game.a, game.b) if game.a <= game.b else (game.b, game.a)
        meetings[key] = meetings.get(key, 0.0) + 1.0
    opponents: dict[str, list[tuple[str, float]]] = {model: [] for model in models}
    for (a, b), count in meetings.items():
        opponents[a].append((b, count))
        opponents[b].append((a, count))
    for _ in range(iterations):
        updated = {}
        for model in models:
            denominator = prior_games / (strength[model] + 1.0)
            denominator += sum(count / (strength[model] + strength[other]) for other, count in opponents[model])
            updated[model] = wins[model] / denominator
        scale = math.exp(sum(math.log(value) for value in updated.values()) / len(updated))
        updated = {model: value / scale for model, value in updated.items()}
        change = max(abs(updated[m] - strength[m]) for m in models)
        strength = updated
        if change < tolerance:
            break
    return strength


def elo(strength: float) -> float:
    return ELO_BASE + 400.0 * math.log10(strength)


def leaderboard(games: Sequence[Game], rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[RatingRow]:
    """Each model's Bradley-Terry rating with a 95 % bootstrap interval (votes resampled with
    replacement), best first."""
    models = sorted({game.a for game in games} | {game.b for game in games})
    if not models:
        return []
    point = {model: elo(value) for model, value in bradley_terry(games, models).items()}
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {model: [] for model in models}
    for _ in range(rounds if len(games) > 1 else 0):
        resampled = [games[rng.randrange(len(games))] for _ in games]
        for model, value in bradley_terry(resampled, models, iterations=200, tolerance=1e-8).items():
            samples[model].append(elo(value))
    played = {model: sum(1 for game in games if model in (game.a, game.b)) for model in models}
    board = []
    for model in models:
        ordered = sorted(samples[model])
        low = ordered[int(0.025 * (len(ordered) - 1))] if ordered else None
        high = ordered[int(math.ceil(0.975 * (len(ordered) - 1)))] if ordered else None
        board.append(RatingRow(model=model, rating=round(point[model], 1), games=played[model],
                               ci95=[round(low, 1) if low is not None else None, round(high, 1) if high is not None else None]))
    return sorted(board, key=lambda row: -row.rating)
