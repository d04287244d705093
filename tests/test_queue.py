"""The model's waiting line: first come, first served, and bounded."""
from __future__ import annotations

import pytest

from app.services.core.errors import QueueFull
from app.services.engine.queue import GenerationQueue


def test_queue_is_first_come_first_served_and_bounded():
    queue = GenerationQueue(max_waiting=2, retry_after_s=4)
    first, second, third = queue.enter(), queue.enter(), queue.enter()
    with pytest.raises(QueueFull) as refused:
        queue.enter()
    assert refused.value.retry_after_s == 4
    assert queue.enter(bypass_limit=True)  # a model switch may always line up
    assert queue.wait(first, 0) == 0
    assert queue.wait(third, 0) == 2
    queue.leave(first)
    assert queue.wait(second, 0) == 0
    assert queue.counts().model_dump() == {"running": 1, "waiting": 2}
