"""What evals and the arena keep on disk: test sets as parsed, eval runs (results/evals/) and blind
votes (results/arena.sqlite3). One layer under both, so each reads the other's records without
importing it."""
