"""Helpers the serving tests share (imported by test_serve_api.py and test_serve_web.py)."""

import time
from collections.abc import Callable

from scratchlm.serve.engine import Generation


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> bool:
    """Poll `condition` until it holds; False after `timeout` seconds. A bound that fails a test
    whose event never comes, not a race: no test asserts how soon it comes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def submitted_generations(app, monkeypatch) -> list[Generation]:
    """The generations the server of `app` (started) submits from now on, in order: each is in
    the queue by the time it is listed."""
    scheduler = app.state.served.scheduler
    generations: list[Generation] = []
    submit_many = scheduler.submit_many

    def recording(*args, **kwargs):
        submitted = submit_many(*args, **kwargs)
        generations.extend(submitted)
        return submitted

    monkeypatch.setattr(scheduler, "submit_many", recording)
    return generations
