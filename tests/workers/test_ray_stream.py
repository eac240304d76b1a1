"""How a trial's messages travel as Ray stream items: the last epoch's report rides with the
result; where no pruner acts on reports, a fast epoch's report waits (a bounded time) for a
later message; everything else goes alone and at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from workers.ray_executor import _BATCH_KIND, FAST_EPOCH_S, HOLD_MAX_S, _stream_items


def _messages(epochs: int, *, fail_after: int | None = None) -> Iterator[dict[str, Any]]:
    yield {"kind": "started", "env": {}}
    for epoch in range(1, epochs + 1):
        yield {"kind": "report", "epoch": epoch, "metrics": {"acc": epoch / 10}}
        if fail_after == epoch:
            raise RuntimeError("boom after the report")
    yield {"kind": "result", "metrics": {"acc": epochs / 10}, "stopped": False, "epochs": epochs}


class Clock:
    """A clock the trial moves: each message is produced ``epoch_s`` after the previous one."""

    def __init__(self, epoch_s: float) -> None:
        self.now = 0.0
        self.epoch_s = epoch_s

    def __call__(self) -> float:
        return self.now

    def timed(self, messages: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for message in messages:
            self.now += self.epoch_s
            yield message


def _stream(
    epochs: int,
    epoch_s: float,
    last_epoch: Any = "epochs",
    *,
    hold_fast: bool = True,
    **kw: Any,
) -> Iterator:
    clock = Clock(epoch_s)
    last = epochs if last_epoch == "epochs" else last_epoch
    messages = clock.timed(_messages(epochs, **kw))
    return _stream_items(messages, last, hold_fast=hold_fast, clock=clock)


def _kinds(item: dict[str, Any]) -> list[str]:
    return [m["kind"] for m in item["items"]] if item["kind"] == _BATCH_KIND else [item["kind"]]


def test_fast_epochs_reports_ride_with_the_next_message():
    items = list(_stream(3, epoch_s=0.001))
    assert [_kinds(i) for i in items] == [["started"], ["report", "report", "report", "result"]]
    assert [m["epoch"] for m in items[1]["items"][:3]] == [1, 2, 3]


def test_with_a_pruner_waiting_fast_epochs_reports_go_alone():
    items = list(_stream(3, epoch_s=0.001, hold_fast=False))
    assert [_kinds(i) for i in items] == [["started"], ["report"], ["report"], ["report", "result"]]


def test_a_report_is_held_no_longer_than_the_bound():
    clock = Clock(FAST_EPOCH_S / 2)  # fast epochs, 200 of them: five times the bound in all
    produced: dict[int, float] = {}

    def timed() -> Iterator[dict[str, Any]]:
        for message in clock.timed(_messages(200)):
            if message["kind"] == "report":
                produced[message["epoch"]] = clock.now
            yield message

    sent = []
    for item in _stream_items(timed(), 200, hold_fast=True, clock=clock):
        sent.append(item)
        for message in item.get("items", [item]):
            if message["kind"] == "report" and message["epoch"] < 200:
                assert clock.now - produced[message["epoch"]] <= HOLD_MAX_S + clock.epoch_s
    assert 2 < len(sent) < 20  # batched, yet not all held to the end


def test_slow_epochs_reports_go_alone_and_the_last_rides_with_the_result():
    items = list(_stream(3, epoch_s=2 * FAST_EPOCH_S))
    assert [_kinds(i) for i in items] == [["started"], ["report"], ["report"], ["report", "result"]]


def test_a_slow_epochs_report_goes_out_before_the_next_epoch_runs():
    pulled: list[str] = []
    clock = Clock(2 * FAST_EPOCH_S)

    def recorded() -> Iterator[dict[str, Any]]:
        for message in clock.timed(_messages(3)):
            pulled.append(message["kind"])
            yield message

    stream = _stream_items(recorded(), 3, hold_fast=True, clock=clock)
    assert next(stream)["kind"] == "started"
    assert next(stream) == {"kind": "report", "epoch": 1, "metrics": {"acc": 0.1}}
    assert pulled == ["started", "report"]  # epoch 2 not yet run


def test_a_held_report_goes_with_the_next_slow_report():
    # Epoch 1 fast, epoch 2 slow: epoch 1's report goes with epoch 2's.
    clock = Clock(0.001)

    def uneven() -> Iterator[dict[str, Any]]:
        for message in clock.timed(_messages(3)):
            if message.get("epoch") == 2:
                clock.now += 2 * FAST_EPOCH_S
            yield message

    items = list(_stream_items(uneven(), 3, hold_fast=True, clock=clock))
    assert [_kinds(i) for i in items] == [["started"], ["report", "report"], ["report", "result"]]


def test_a_failure_after_held_reports_sends_them_then_raises():
    stream = _stream(3, epoch_s=0.001, fail_after=2)
    assert _kinds(next(stream)) == ["started"]
    held = next(stream)
    assert _kinds(held) == ["report", "report"]
    with pytest.raises(RuntimeError, match="boom after the report"):
        next(stream)


def test_a_failure_right_after_a_slow_report_raises_at_once():
    stream = _stream(2, epoch_s=2 * FAST_EPOCH_S, fail_after=1)
    assert [_kinds(next(stream)) for _ in range(2)] == [["started"], ["report"]]
    with pytest.raises(RuntimeError, match="boom after the report"):
        next(stream)


@pytest.mark.parametrize("last_epoch", [None, "3", 5])
def test_without_a_known_last_epoch_slow_reports_go_alone(last_epoch):
    items = list(_stream(3, epoch_s=2 * FAST_EPOCH_S, last_epoch=last_epoch))
    kinds = [_kinds(i) for i in items]
    assert kinds == [["started"], ["report"], ["report"], ["report"], ["result"]]


def test_messages_that_end_after_a_held_report_still_send_it():
    def no_result() -> Iterator[dict[str, Any]]:
        yield {"kind": "started", "env": {}}
        yield {"kind": "report", "epoch": 1, "metrics": {}}

    items = list(_stream_items(no_result(), 1, hold_fast=True, clock=Clock(0.0)))
    assert [_kinds(i) for i in items] == [["started"], ["report"]]
