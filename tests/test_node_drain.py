"""A node job's drain (``bridge/node.py`` ``_Drain``): a wake while the job runs makes it go
round again before it leaves, without asking the scheduler; a wake while it is idle asks."""

from __future__ import annotations

import threading

from bridge.node import _Drain


def test_a_wake_while_running_goes_round_again_and_an_idle_one_asks_the_scheduler() -> None:
    rounds: list[int] = []
    entered = threading.Event()
    release = threading.Event()

    def step() -> tuple[int, bool]:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            entered.set()
            assert release.wait(10)
        return 0, False  # nothing moved: it leaves unless woken meanwhile

    drain = _Drain(step)
    assert drain.wake() is True  # idle: the caller asks the scheduler
    job = threading.Thread(target=drain)
    job.start()
    assert entered.wait(10)
    assert drain.running is True
    assert drain.wake() is False  # running: no scheduler call, it goes round again instead
    release.set()
    job.join(10)
    assert not job.is_alive()
    assert rounds == [0, 1]  # the wake's round, then it left
    assert drain.running is False
    assert drain.wake() is True


def test_a_failing_step_leaves_at_once_and_the_drain_is_idle_after() -> None:
    calls: list[str] = []

    def step() -> tuple[int, bool]:
        calls.append("x")
        raise RuntimeError("boom")

    drain = _Drain(step)
    drain.wake()  # dirty before it starts: a failure still leaves, no tight loop
    drain()
    assert calls == ["x"]
    assert drain.running is False
    assert drain.wake() is True
