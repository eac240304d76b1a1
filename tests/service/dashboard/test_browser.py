"""The dashboard in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser), against a live server running trials in threads with the zero-work sleep runner.

Charts are checked by what Plotly holds (``document.getElementById('chart-…').data``), not by
the page merely loading. ``TSAM_SCREENSHOTS=docs/img`` also saves the README's screenshots.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import Database
from service.studies.models import Study
from service.studies.service import new_study_id
from service.studies.spec import StudySpec
from service.trials import service as trials
from tests.service.live import LocalServer, local_server, sleep_spec

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Generous: on a shared 2-core machine under load, plotly.js alone can take a minute to start.
TIMEOUT_MS = 180_000
CHART_KEYS = ("history", "intermediate", "parallel", "slice", "importance", "pareto", "flatness")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with local_server(tmp_path_factory.mktemp("dashboard")) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def context(browser: Any) -> Iterator[Any]:
    """One context for the module: its HTTP and code caches keep plotly.js (4.8 MB) parsed
    once, which matters on a loaded 2-core machine."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    yield pg
    pg.close()
    assert errors == [], errors


@pytest.fixture(scope="module")
def finished(server: LocalServer) -> dict[str, Any]:
    """A finished single-objective study: 8 trials of 4 epochs, some pruned by the median."""
    spec = sleep_spec(
        "dashboard-sleep",
        task={"dataset": "digits", "model": "mlp", "epochs": 4},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        budget={"n_trials": 8, "max_parallel": 2},
        runner={"name": "sleep", "sleep_s": 0.05},
    )
    study = server.submit(spec)
    return server.wait_done(study["id"])


@pytest.fixture(scope="module")
def flat_study(server: LocalServer) -> dict[str, Any]:
    """A finished two-objective study (accuracy up, sharpness down) over TSAM's t with SAM
    and ERM trials, stored directly: what a digits run records, in a second."""
    spec = StudySpec.model_validate(
        {
            "name": "digits-flatness",
            "task": {"dataset": "digits", "model": "mlp", "epochs": 3, "label_noise": 0.3},
            "optimizer": {"method": "tsam", "t": 1.0, "rho": 0.05, "samples": 3},
            "search_space": {
                "method": {"type": "categorical", "choices": ["tsam", "sam", "erm"]},
                "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
            },
            "objective": [
                {"metric": "val_accuracy", "direction": "maximize"},
                {"metric": "sharpness", "direction": "minimize"},
            ],
            "sampler": {"name": "nsga2", "seed": 0},
            "budget": {"n_trials": 7, "max_parallel": 2},
        }
    )
    runs = [("tsam", t) for t in (0.1, 1.0, 5.0, 20.0, 100.0)] + [("sam", None), ("erm", None)]
    db = Database(server.database_url)
    try:
        with db.write() as session:
            study = Study(
                id=new_study_id(),
                owner="local",
                name=spec.name,
                spec=spec.model_dump(mode="json"),
                status="completed",
            )
            session.add(study)
            session.flush()
            for i, (method, t) in enumerate(runs):
                params: dict[str, Any] = {"method": method} | ({"t": t} if t else {})
                trial = trials.create_trial(session, study=study, params=params)
                lease = trials.claim(session, trial)
                assert lease is not None
                acc = {"erm": 0.78, "sam": 0.85}.get(method, 0.83 + 0.01 * i)
                sharp = {"erm": 0.42, "sam": 0.2}.get(method, 0.3 - 0.04 * i)
                for epoch in (1, 2, 3):
                    m = {"val_accuracy": acc - 0.1 * (3 - epoch), "epoch": float(epoch)}
                    trials.record_report(
                        session, trial.pk, lease, epoch=epoch, attempt=1, metrics=m
                    )
                metrics = {"val_accuracy": acc, "test_accuracy": acc - 0.02, "sharpness": sharp}
                trials.finish(
                    session,
                    trial.pk,
                    lease,
                    trials.Outcome("complete", acc, [acc, sharp], metrics),
                )
            study_id = study.id
    finally:
        db.dispose()
    return httpx.get(f"{server.url}/api/v1/studies/{study_id}").json()


def trial_items(server: LocalServer, study_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = httpx.get(
        f"{server.url}/api/v1/studies/{study_id}/trials"
    ).json()["items"]
    return items


def chart(page: Any, key: str) -> Any:
    return page.evaluate(
        """key => {
            const d = document.getElementById(key).data;
            return d ? JSON.parse(JSON.stringify(d)) : null;
        }""",
        f"chart-{key}",
    )


def wait_charts(page: Any, keys: tuple[str, ...]) -> None:
    """Until each chart is drawn or shows its state line."""
    for key in keys:
        page.wait_for_function(
            """key => document.getElementById(key).data
                || !document.getElementById(key + '-state').classList.contains('loading')""",
            arg=f"chart-{key}",
        )


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("TSAM_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


def test_studies_page_lists_a_submitted_study(server, finished, flat_study, page, tmp_path):
    page.goto(server.url + "/")
    row = page.locator(f'tr[data-study-id="{finished["id"]}"]')
    assert "dashboard-sleep" in row.inner_text()
    assert row.locator(".badge").inner_text() == "completed"
    assert "8/8" in row.locator(".progress-text").inner_text()
    assert page.locator(f'tr[data-study-id="{flat_study["id"]}"]').count() == 1
    shot(page, tmp_path, "studies.png")
    page.goto(server.url + "/?status=failed")
    assert page.locator("#studies-empty").inner_text().startswith("No failed studies")
    row = page.locator(f'tr[data-study-id="{finished["id"]}"]')
    assert row.count() == 0


def test_study_page_draws_every_chart_from_the_finished_study(server, finished, page):
    items = trial_items(server, finished["id"])
    complete = [t for t in items if t["state"] == "complete"]
    epochs = sum(len(c["points"]) for c in _curves(server, finished["id"]))
    page.goto(f"{server.url}/studies/{finished['id']}")
    wait_charts(page, CHART_KEYS)

    history = chart(page, "history")
    assert history[0]["x"] == [t["number"] for t in complete]
    assert history[0]["y"] == pytest.approx([t["value"] for t in complete])
    assert history[1]["name"] == "best so far"
    assert history[1]["y"][-1] == pytest.approx(finished["best_trial"]["value"])

    lines = [tr for tr in chart(page, "intermediate") if tr["name"] != "pruned here"]
    assert sum(1 for tr in lines for x in tr["x"] if x is not None) == epochs
    assert {tr["name"] for tr in lines} == {t["state"] for t in items}
    pruned = [t for t in items if t["state"] == "pruned"]
    cuts = [tr for tr in chart(page, "intermediate") if tr["name"] == "pruned here"]
    assert (len(cuts[0]["x"]) if cuts else 0) == len(pruned)

    (parallel,) = chart(page, "parallel")
    labels = {"t": "log10(t)", "rho": "log10(rho)", "samples": "samples"}
    searched = [labels[k] for k in finished["spec"]["search_space"]]
    assert [d["label"] for d in parallel["dimensions"]] == [*searched, "val_accuracy"]
    assert all(len(d["values"]) == len(complete) for d in parallel["dimensions"])

    slices = chart(page, "slice")
    assert [tr["name"] for tr in slices] == ["t", "rho", "samples"]
    assert all(len(tr["x"]) == len(complete) for tr in slices)

    (importance,) = chart(page, "importance")
    assert sorted(importance["y"]) == ["rho", "samples", "t"]
    assert sum(importance["x"]) == pytest.approx(1.0)

    assert chart(page, "pareto") is None
    assert "Single-objective" in page.locator("#chart-pareto-state").inner_text()
    assert chart(page, "flatness") is None
    assert "sharpness" in page.locator("#chart-flatness-state").inner_text()

    rows = page.locator("#trial-table tbody tr")
    assert rows.count() == len(items)
    assert page.locator("#study-status").inner_text() == "completed"
    # Sorting: a click on "#" turns the default (newest first) around.
    assert rows.first.get_attribute("data-number") == str(len(items) - 1)
    page.locator('#trial-table th[data-key="number"]').click()
    assert rows.first.get_attribute("data-number") == "0"


def test_study_page_draws_the_pareto_front_and_flatness_against_t(
    server, flat_study, page, tmp_path
):
    page.goto(f"{server.url}/studies/{flat_study['id']}")
    wait_charts(page, CHART_KEYS)
    pareto = {tr["name"]: tr for tr in chart(page, "pareto")}
    front = [t["number"] for t in flat_study["best_trials"]]
    assert sorted(int(s.split()[-1]) for s in pareto["Pareto front"]["text"]) == sorted(front)
    assert len(pareto["trials"]["x"]) + len(pareto["Pareto front"]["x"]) == 7

    flat = {tr["name"]: tr for tr in chart(page, "flatness")}
    assert flat["TSAM test_accuracy"]["x"] == [0.1, 1.0, 5.0, 20.0, 100.0]
    assert flat["TSAM sharpness"]["y"] == pytest.approx([0.3, 0.26, 0.22, 0.18, 0.14])
    assert flat["SAM sharpness"]["y"] == pytest.approx([0.2, 0.2])
    assert flat["ERM (#6)"]["y"] == pytest.approx([0.76, 0.76])

    history = chart(page, "history")
    assert [tr["name"] for tr in history] == ["val_accuracy", "sharpness"]
    assert all(len(tr["x"]) == 7 for tr in history)
    (parallel,) = chart(page, "parallel")  # t is not set for SAM/ERM: only method remains
    assert [d["label"] for d in parallel["dimensions"]] == ["method", "val_accuracy", "sharpness"]
    (importance,) = chart(page, "importance")
    assert importance["y"] == ["method"]
    assert len(chart(page, "slice")[0]["x"]) == 5
    shot(page, tmp_path, "study.png")


def test_a_trial_finishing_during_the_visit_appears_without_a_reload(server, page):
    # Stored paused (the scheduler leaves it alone) so the page is open and subscribed
    # before any trial starts, however long the browser takes to load it.
    spec = sleep_spec(
        "dashboard-live",
        task={"dataset": "digits", "model": "mlp", "epochs": 2},
        budget={"n_trials": 3, "max_parallel": 1},
        runner={"name": "sleep", "sleep_s": 0.3},
    )
    study_id = new_study_id()
    db = Database(server.database_url)
    try:
        with db.write() as session:
            session.add(
                Study(
                    id=study_id,
                    owner="local",
                    name=spec["name"],
                    spec=StudySpec.model_validate(spec).model_dump(mode="json"),
                    status="paused",
                )
            )
        page.goto(f"{server.url}/studies/{study_id}")
        page.evaluate("window.__visit = 'same page'")
        assert "No trials yet" in page.locator("#trials-state").inner_text()
        assert "No trials yet" in page.locator("#chart-history-state").inner_text()
        page.wait_for_function("() => document.getElementById('live').textContent === '● live'")
        with db.write() as session:
            row = session.get(Study, session.query(Study.pk).filter_by(id=study_id).scalar())
            assert row is not None
            row.status = "queued"
        server.app.state.scheduler.wake()
    finally:
        db.dispose()
    page.wait_for_function(
        """() => {
            const b = document.querySelector('#trial-table tr[data-number="2"] .badge');
            return b && b.textContent === 'complete';
        }"""
    )
    page.wait_for_function(
        "() => document.getElementById('study-status').textContent === 'completed'"
    )
    assert page.evaluate("window.__visit") == "same page"
    assert len(chart(page, "history")[0]["x"]) == 3
    assert page.locator("#live").inner_text() == "finished"
    assert "3/3 done" in page.locator("#study-progress").inner_text()


def test_trial_page_shows_its_params_and_curves(server, finished, page, tmp_path):
    detail = httpx.get(f"{server.url}/api/v1/studies/{finished['id']}/trials/0").json()
    page.goto(f"{server.url}/studies/{finished['id']}/trials/0")
    wait_charts(page, ("trial-curves",))
    curves = {tr["name"]: tr for tr in chart(page, "trial-curves")}
    assert set(curves) == {"val_accuracy", "val_loss"}
    assert curves["val_accuracy"]["x"] == [r["epoch"] for r in detail["intermediate"]]
    assert curves["val_accuracy"]["y"] == pytest.approx(
        [r["val_accuracy"] for r in detail["intermediate"]]
    )
    params = page.locator("#trial-params").inner_text()
    assert all(k in params for k in ("t", "rho", "samples"))
    assert page.locator("#trial-state").inner_text() == detail["state"]
    assert "pid" in page.locator("#trial-env").inner_text()
    shot(page, tmp_path, "trial.png")


def test_unknown_pages_are_designed_404s(server, page):
    response = page.goto(f"{server.url}/studies/nope")
    assert response.status == 404
    assert "No study" in page.locator("main").inner_text()


def _curves(server: LocalServer, study_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = httpx.get(
        f"{server.url}/api/v1/studies/{study_id}/curves"
    ).json()["items"]
    return items
