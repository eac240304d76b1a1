"""Live events (server-sent, over real HTTP), parameter importances and bulk curves."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.events import EventBroker, format_event, sse_stream
from tests.service.live import LocalServer, local_server, sleep_spec


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with local_server(tmp_path_factory.mktemp("insights")) as live:
        yield live


def read_events(url: str, timeout: float = 60) -> list[tuple[str, dict[str, Any]]]:
    """Every event of one stream until the server ends it."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = None
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[len("data: ") :])))
                name = None
    return events


def test_event_stream_follows_a_real_run_in_order_and_ends_with_the_study(server):
    study = server.submit(
        sleep_spec(
            "events",
            budget={"n_trials": 4, "max_parallel": 1},
            runner={"name": "sleep", "sleep_s": 0.15},
        )
    )
    events = read_events(f"{server.url}/api/v1/studies/{study['id']}/events")
    assert events[-1] == ("study", {"type": "study", "status": "completed"})
    by_trial: dict[int, list[str]] = {}
    for name, data in events[:-1]:
        assert name == data["type"]
        label = f"report{data['epoch']}" if name == "trial_report" else name
        by_trial.setdefault(data["number"], []).append(label)
    # The first trial(s) may have begun before the stream opened (a loaded machine is slow to
    # connect): each trial's events are a suffix of the full sequence, and once one trial is
    # seen whole every later one is too.
    full = ["trial_started", "report1", "report2", "report3", "trial_finished"]
    whole = False
    for number in sorted(by_trial):
        seen = by_trial[number]
        assert seen == full[len(full) - len(seen) :], (number, seen)
        assert not whole or seen == full, (number, seen)
        whole = whole or seen == full
    assert by_trial[3] == full
    starts = [d["number"] for n, d in events if n == "trial_started"]
    finishes = [d for n, d in events if n == "trial_finished"]
    assert starts == sorted(starts) and [d["number"] for d in finishes][-1] == 3
    assert all(d["state"] == "complete" and 0 < d["value"] <= 1 for d in finishes)
    # A finished study's stream answers its status at once and ends.
    assert read_events(f"{server.url}/api/v1/studies/{study['id']}/events") == [
        ("study", {"type": "study", "status": "completed"})
    ]


def test_events_of_an_unknown_or_other_owners_study_are_404(server):
    assert httpx.get(f"{server.url}/api/v1/studies/nope/events").status_code == 404
    study = server.submit(sleep_spec("mine", budget={"n_trials": 1}))
    server.app.state.settings.default_owner = "someone-else"
    try:
        r = httpx.get(f"{server.url}/api/v1/studies/{study['id']}/events")
        assert r.status_code == 404
        assert httpx.get(f"{server.url}/api/v1/studies/{study['id']}/importance").status_code == 404
    finally:
        server.app.state.settings.default_owner = "local"
    server.wait_done(study["id"])


def test_importance_has_a_value_per_searched_param_for_a_finished_study(server):
    study = server.submit(sleep_spec("importance", budget={"n_trials": 8, "max_parallel": 2}))
    server.wait_done(study["id"])
    base = f"{server.url}/api/v1/studies/{study['id']}/importance"
    for evaluator in ("fanova", "mean_decrease_impurity", "ped_anova"):
        r = httpx.get(base, params={"evaluator": evaluator}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["importances"]) == {"t", "rho", "samples"}, body
        assert body["evaluator"] == evaluator and body["n_trials"] == 8
        assert body["objective"] == "val_accuracy" and body["message"] is None
        assert sum(body["importances"].values()) == pytest.approx(1.0)
    # fANOVA is the default and seeded: the same answer twice.
    assert httpx.get(base).json() == httpx.get(base, params={"evaluator": "fanova"}).json()
    # The sleep runner's objective depends on t, rho and samples; t spans four decades.
    assert httpx.get(base, params={"evaluator": "bogus"}).status_code == 422
    assert httpx.get(base, params={"objective": 1}).status_code == 422


def test_importance_is_empty_with_a_reason_below_two_trials_or_without_a_search(server):
    one = server.submit(sleep_spec("one", budget={"n_trials": 1}))
    fixed = server.submit(sleep_spec("fixed", search_space={}, budget={"n_trials": 2}))
    for study in (one, fixed):
        server.wait_done(study["id"])
        body = httpx.get(f"{server.url}/api/v1/studies/{study['id']}/importance").json()
        assert body["importances"] == {} and body["message"]


def test_curves_pages_one_metric_of_every_trial(server):
    study = server.submit(sleep_spec("curves", budget={"n_trials": 3, "max_parallel": 2}))
    server.wait_done(study["id"])
    base = f"{server.url}/api/v1/studies/{study['id']}/curves"
    first = httpx.get(base, params={"limit": 2}).json()
    rest = httpx.get(base, params={"limit": 2, "after": first["next_after"]}).json()
    assert first["metric"] == "val_accuracy" and rest["next_after"] is None
    items = first["items"] + rest["items"]
    assert [c["number"] for c in items] == [0, 1, 2]
    for c in items:
        assert [e for e, _ in c["points"]] == [1, 2, 3]
        values = [v for _, v in c["points"]]
        assert values == sorted(values)  # the sleep runner's accuracy rises every epoch
    loss = httpx.get(base, params={"metric": "val_loss"}).json()
    assert loss["metric"] == "val_loss" and len(loss["items"][0]["points"]) == 3


# -- the broker and the stream on their own --------------------------------------------------


def collect(broker: EventBroker, status: list[str], publish: list[dict[str, Any]]) -> list[str]:
    """Chunks of one stream whose study reads ``status`` (one answer per ask, the last
    repeated), with ``publish`` sent from another thread once subscribed."""

    async def main() -> list[str]:
        sub = broker.subscribe("s1")
        answers = iter(status)
        last = status[-1]

        async def read_status() -> str:
            return next(answers, last)

        def send() -> None:
            for event in publish:
                broker.publish("s1", event)

        threading.Thread(target=send).start()
        chunks = [c async for c in sse_stream(broker, sub, read_status)]
        assert broker.subscribers("s1") == 0
        return chunks

    return asyncio.run(asyncio.wait_for(main(), 10))


def test_stream_sends_keepalives_and_ends_when_the_stored_status_turns_finished():
    broker = EventBroker(keepalive_s=0.05)
    chunks = collect(broker, ["running", "running", "running", "cancelled"], [])
    assert chunks[0].startswith("retry: ")
    assert chunks.count(": keep-alive\n\n") == 2
    assert chunks[-1] == format_event("study", {"type": "study", "status": "cancelled"})


def test_events_published_from_another_thread_arrive_in_order_with_ids():
    broker = EventBroker(keepalive_s=5)
    events = [{"type": "trial_report", "number": 0, "epoch": e} for e in range(1, 50)]
    chunks = collect(broker, ["running"], [*events, {"type": "study", "status": "completed"}])
    sent = [c for c in chunks if c.startswith("event: ")]
    assert sent[:-1] == [format_event("trial_report", e, i + 1) for i, e in enumerate(events)]
    assert sent[-1].startswith("event: study\nid: 50\n")


def test_a_reader_that_falls_behind_is_told_to_resync():
    broker = EventBroker(keepalive_s=5, queue_size=4)
    events = [{"type": "trial_report", "number": 0, "epoch": e} for e in range(1, 20)]

    async def main() -> list[str]:
        sub = broker.subscribe("s1")
        for event in events:  # on this thread, before the reader runs: the queue overflows
            broker.publish("s1", event)
        await asyncio.sleep(0.05)

        async def running() -> str:
            return "running"

        return [c async for c in sse_stream(broker, sub, running)]

    chunks = asyncio.run(asyncio.wait_for(main(), 10))
    assert chunks[-1] == format_event("resync", {"type": "resync"})


def test_closing_the_broker_ends_open_streams():
    broker = EventBroker(keepalive_s=5)

    async def main() -> list[str]:
        sub = broker.subscribe("s1")

        async def running() -> str:
            return "running"

        threading.Timer(0.1, broker.close).start()
        return [c async for c in sse_stream(broker, sub, running)]

    chunks = asyncio.run(asyncio.wait_for(main(), 10))
    assert chunks == ["retry: 3000\n: connected\n\n"]
    assert broker.closed and broker.subscribers("s1") == 0


def test_broker_rejects_bad_settings():
    with pytest.raises(ValueError):
        EventBroker(keepalive_s=0)
    with pytest.raises(ValueError):
        EventBroker(queue_size=1)
