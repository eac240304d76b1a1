"""How a trial's messages travel as Ray stream items: the last epoch's report rides with the
result (one item fewer per trial), every other message goes alone and at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from workers.ray_executor import _BATCH_KIND, _final_report_with_result


def _messages(epochs: int, *, fail_after: int | None = None) -> Iterator[dict[str, Any]]:
    yield {"kind": "started", "env": {}}
    for epoch in range(1, epochs + 1):
        yield {"kind": "report", "epoch": epoch, "metrics": {"acc": epoch / 10}}
        if fail_after == epoch:
            raise RuntimeError("boom after the report")
    yield {"kind": "result", "metrics": {"acc": epochs / 10}, "stopped": False, "epochs": epochs}


def test_the_last_epochs_report_travels_with_the_result():
    items = list(_final_report_with_result(_messages(3), 3))
    assert [i["kind"] for i in items] == ["started", "report", "report", _BATCH_KIND]
    assert [m["kind"] for m in items[-1]["items"]] == ["report", "result"]
    assert items[-1]["items"][0]["epoch"] == 3


def test_earlier_reports_go_out_before_the_next_message_is_produced():
    pulled: list[str] = []

    def recorded() -> Iterator[dict[str, Any]]:
        for message in _messages(3):
            pulled.append(message["kind"])
            yield message

    stream = _final_report_with_result(recorded(), 3)
    assert next(stream)["kind"] == "started"
    first = next(stream)
    assert first == {"kind": "report", "epoch": 1, "metrics": {"acc": 0.1}}
    assert pulled == ["started", "report"]  # epoch 2 not yet run


def test_a_failure_after_the_last_report_sends_the_report_then_raises():
    stream = _final_report_with_result(_messages(2, fail_after=2), 2)
    kinds = [next(stream)["kind"] for _ in range(3)]
    assert kinds == ["started", "report", "report"]
    with pytest.raises(RuntimeError, match="boom after the report"):
        next(stream)


@pytest.mark.parametrize("last_epoch", [None, "3", 5])
def test_without_a_known_last_epoch_every_message_goes_alone(last_epoch):
    items = list(_final_report_with_result(_messages(3), last_epoch))
    assert [i["kind"] for i in items] == ["started", "report", "report", "report", "result"]
