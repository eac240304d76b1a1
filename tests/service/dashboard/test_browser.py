"""The dashboard in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser), against the session's live server (``live_server``: the scheduler and a
RayExecutor on the session's local Ray).

The charts are checked on real finished digits studies -- trials that train with the default
``train`` runner and measure sharpness at the end -- by what Plotly holds
(``document.getElementById('chart-…').data``), point for point against the JSON API, not by
the page merely loading. ``TSAM_SCREENSHOTS=docs/img`` also saves the README's screenshots.
"""

from __future__ import annotations

import math
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
from tests.service.live import LocalServer, sleep_spec

pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.slow]

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
STUDY_TIMEOUT_S = 600
CHART_KEYS = ("history", "intermediate", "parallel", "slice", "importance", "pareto", "flatness")

EPOCHS = 3
# method first, then t and rho (TSAM; rho also SAM) only for the methods that use them, and
# lr for every trial. Each trial trains an MLP on digits for EPOCHS epochs (well under a
# second of compute) and measures its flatness (``sharpness``) at the end with TrainConfig's
# cheap defaults (512 examples, 8 draws at sigma 0.01 and 0.05).
SEARCH_SPACE: dict[str, Any] = {
    "method": {"type": "categorical", "choices": ["erm", "sam", "tsam"]},
    "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
    "rho": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
    "lr": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
}
# Seeds that draw every method: the random sampler (seed 14) gives trials 0-4 TSAM, 5 ERM and
# 6 SAM; NSGA-II's random first generation (seed 4) gives TSAM, ERM, TSAM, SAM, ERM, SAM, whose
# front (digits training is seeded) has one trial of each method.
DIGITS = {
    "name": "dashboard-digits",
    "description": "ERM, SAM and TSAM on digits with 20% label noise",
    "task": {
        "dataset": "digits",
        "model": "mlp",
        "epochs": EPOCHS,
        "batch_size": 64,
        "label_noise": 0.2,
        "seed": 0,
    },
    "optimizer": {"method": "tsam", "lr": 0.05, "t": 1.0, "rho": 0.05, "samples": 2},
    "search_space": SEARCH_SPACE,
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "sampler": {"name": "random", "seed": 14},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 7, "max_parallel": 2},
    "resources": {"cpus": 1},
}
DIGITS_PARETO = DIGITS | {
    "name": "dashboard-digits-pareto",
    "description": "accuracy up, sharpness down",
    "objective": [
        {"metric": "val_accuracy", "direction": "maximize"},
        {"metric": "sharpness", "direction": "minimize"},
    ],
    "sampler": {"name": "nsga2", "seed": 4},
    "budget": {"n_trials": 6, "max_parallel": 2},
}
LABELS = {"method": "method", "t": "log10(t)", "rho": "log10(rho)", "lr": "log10(lr)"}


@pytest.fixture(scope="module")
def server(live_server: LocalServer) -> LocalServer:
    """The session's one live server (trials on the session's Ray)."""
    return live_server


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
def digits_studies(server: LocalServer) -> dict[str, dict[str, Any]]:
    """Both digits studies, submitted together (they share the two slots) and run to the end
    on Ray: the single-objective one and the two-objective (Pareto) one."""
    submitted = {"single": server.submit(DIGITS), "pareto": server.submit(DIGITS_PARETO)}
    done = {k: server.wait_done(s["id"], timeout=STUDY_TIMEOUT_S) for k, s in submitted.items()}
    for key, study in done.items():
        n = study["spec"]["budget"]["n_trials"]
        assert study["status"] == "completed" and study["counts"] == {"complete": n}, study
        items = trial_items(server, study["id"])
        # The seeds are chosen to draw every method; each trial trained, reported every epoch
        # and measured its sharpness.
        assert {t["params"]["method"] for t in items} == {"erm", "sam", "tsam"}, (key, items)
        for t in items:
            m = t["metrics"]
            assert 0.0 <= m["val_accuracy"] <= 1.0 and 0.0 <= m["test_accuracy"] <= 1.0, t
            assert math.isfinite(m["sharpness"]) and math.isfinite(m["loss_clean"]), t
    return done


@pytest.fixture(scope="module")
def finished(digits_studies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The finished single-objective digits study: 7 trials, TSAM (0-4), ERM (5), SAM (6)."""
    return digits_studies["single"]


@pytest.fixture(scope="module")
def flat_study(digits_studies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The finished two-objective digits study (val_accuracy up, sharpness down): 6 trials."""
    return digits_studies["pareto"]


def trial_items(server: LocalServer, study_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = httpx.get(
        f"{server.url}/api/v1/studies/{study_id}/trials", timeout=30
    ).json()["items"]
    return sorted(items, key=lambda t: t["number"])


def curves(server: LocalServer, study_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = httpx.get(
        f"{server.url}/api/v1/studies/{study_id}/curves", timeout=30
    ).json()["items"]
    return items


def importances(server: LocalServer, study_id: str) -> dict[str, float]:
    body = httpx.get(
        f"{server.url}/api/v1/studies/{study_id}/importance?evaluator=fanova", timeout=120
    ).json()
    result: dict[str, float] = body["importances"]
    return result


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


def points(trace: dict[str, Any]) -> int:
    """The points of a trace (lines are broken between trials by nulls)."""
    return sum(1 for x in trace["x"] if x is not None)


def objective(trial: dict[str, Any], i: int) -> Any:
    """A trial's i-th objective value, as the page reads it."""
    values = trial["values"] or ([trial["value"]] if i == 0 else [])
    return values[i]


def by_method(complete: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [t for t in complete if t["params"]["method"] == method]


def check_intermediate(page: Any, server: LocalServer, study_id: str, n_trials: int) -> None:
    """Every trial's per-epoch objective, in trial order, one line per state."""
    items = trial_items(server, study_id)
    expected = {c["number"]: c["points"] for c in curves(server, study_id)}
    assert sorted(expected) == [t["number"] for t in items]
    assert all(len(p) == EPOCHS for p in expected.values()), expected
    lines = [tr for tr in chart(page, "intermediate") if tr["name"] != "pruned here"]
    assert sum(points(tr) for tr in lines) == n_trials * EPOCHS
    assert {tr["name"] for tr in lines} == {t["state"] for t in items} == {"complete"}
    (line,) = lines
    want_x: list[Any] = []
    want_y: list[Any] = []
    for number in sorted(expected):
        want_x += [e for e, _ in expected[number]] + [None]
        want_y += [v for _, v in expected[number]] + [None]
    assert line["x"] == want_x
    assert [y is None for y in line["y"]] == [y is None for y in want_y]
    assert [y for y in line["y"] if y is not None] == pytest.approx(
        [y for y in want_y if y is not None]
    )
    # No trial was pruned, so no "pruned here" marker.
    assert [tr for tr in chart(page, "intermediate") if tr["name"] == "pruned here"] == []


def check_parallel(page: Any, complete: list[dict[str, Any]], objectives: list[str]) -> None:
    """One axis per searched parameter every complete trial has (method and lr: t and rho are
    conditional), then the objectives; one line per complete trial."""
    (parallel,) = chart(page, "parallel")
    dims = {d["label"]: d for d in parallel["dimensions"]}
    assert list(dims) == ["method", "log10(lr)", *objectives]
    assert all(len(d["values"]) == len(complete) for d in dims.values())
    choices = SEARCH_SPACE["method"]["choices"]
    assert dims["method"]["values"] == [choices.index(t["params"]["method"]) for t in complete]
    assert dims["method"]["ticktext"] == choices
    assert dims["log10(lr)"]["values"] == pytest.approx(
        [math.log10(t["params"]["lr"]) for t in complete]
    )
    for i, name in enumerate(objectives):
        assert dims[name]["values"] == pytest.approx([objective(t, i) for t in complete])


def check_slices(page: Any, complete: list[dict[str, Any]]) -> None:
    """The objective against t (TSAM trials) and rho (SAM and TSAM trials)."""
    slices = {tr["name"]: tr for tr in chart(page, "slice")}
    assert list(slices) == ["t", "rho"]
    for key in ("t", "rho"):
        having = [t for t in complete if key in t["params"]]
        assert len(slices[key]["x"]) == len(having) > 0
        assert slices[key]["x"] == pytest.approx([t["params"][key] for t in having])
        assert slices[key]["y"] == pytest.approx([objective(t, 0) for t in having])
    assert len(slices["t"]["x"]) == len(by_method(complete, "tsam"))
    assert len(slices["rho"]["x"]) == len(complete) - len(by_method(complete, "erm"))


def check_importance(page: Any, server: LocalServer, study_id: str) -> None:
    """The bars are the API's fANOVA importances, smallest first."""
    api = importances(server, study_id)
    assert set(api) == {"method", "lr"}, api
    (bars,) = chart(page, "importance")
    assert bars["y"] == sorted(api, key=lambda k: api[k])
    assert bars["x"] == pytest.approx([api[k] for k in bars["y"]])
    assert sum(bars["x"]) == pytest.approx(1.0)


def check_flatness(page: Any, complete: list[dict[str, Any]]) -> None:
    """Test accuracy and sharpness of each TSAM trial against its t, with SAM and ERM drawn
    as reference lines (named by their trial numbers)."""
    flat = {tr["name"]: tr for tr in chart(page, "flatness")}
    tsam = by_method(complete, "tsam")
    ts = [t["params"]["t"] for t in tsam]
    assert flat["TSAM test_accuracy"]["x"] == pytest.approx(ts)
    assert flat["TSAM test_accuracy"]["y"] == pytest.approx(
        [t["metrics"]["test_accuracy"] for t in tsam]
    )
    assert flat["TSAM sharpness"]["x"] == pytest.approx(ts)
    assert flat["TSAM sharpness"]["y"] == pytest.approx([t["metrics"]["sharpness"] for t in tsam])
    refs = []
    for method in ("sam", "erm"):
        rows = by_method(complete, method)
        label = method.upper()
        numbers = ", ".join(f"#{t['number']}" for t in rows)
        lines = {f"{label} ({numbers})": "test_accuracy", f"{label} sharpness": "sharpness"}
        refs += list(lines)
        for trace, metric in lines.items():
            mean = sum(t["metrics"][metric] for t in rows) / len(rows)
            assert flat[trace]["y"] == pytest.approx([mean, mean]), trace
            assert flat[trace]["x"] == pytest.approx([min(ts), max(ts)]), trace
    assert sorted(flat) == sorted(["TSAM test_accuracy", "TSAM sharpness", *refs])


def test_studies_page_lists_the_finished_studies(
    server: LocalServer,
    finished: dict[str, Any],
    flat_study: dict[str, Any],
    page: Any,
    tmp_path: Path,
) -> None:
    page.goto(server.url + "/")
    row = page.locator(f'tr[data-study-id="{finished["id"]}"]')
    assert "dashboard-digits" in row.inner_text()
    assert row.locator(".badge").inner_text() == "completed"
    assert "7/7" in row.locator(".progress-text").inner_text()
    assert f"#{finished['best_trial']['number']}" in row.inner_text()
    assert "erm / sam / tsam" in row.inner_text()
    pareto = page.locator(f'tr[data-study-id="{flat_study["id"]}"]')
    assert "6/6" in pareto.locator(".progress-text").inner_text()
    assert f"{len(flat_study['best_trials'])} on the front" in pareto.inner_text()
    shot(page, tmp_path, "studies.png")
    # The session's server may hold other tests' studies: every row shown is a failed one.
    page.goto(server.url + "/?status=failed")
    assert page.locator(f'tr[data-study-id="{finished["id"]}"]').count() == 0
    badges = page.locator("#studies .badge").all_inner_texts()
    assert set(badges) <= {"failed"}
    if not badges:
        assert page.locator("#studies-empty").inner_text().startswith("No failed studies")


def test_study_page_draws_every_chart_from_the_finished_digits_study(
    server: LocalServer, finished: dict[str, Any], page: Any
) -> None:
    items = trial_items(server, finished["id"])
    complete = [t for t in items if t["state"] == "complete"]
    assert len(complete) == len(items) == 7
    page.goto(f"{server.url}/studies/{finished['id']}")
    wait_charts(page, CHART_KEYS)

    history = chart(page, "history")
    assert history[0]["name"] == "val_accuracy"
    assert history[0]["x"] == [t["number"] for t in complete]
    assert history[0]["y"] == pytest.approx([t["value"] for t in complete])
    assert history[1]["name"] == "best so far"
    best = [max(t["value"] for t in complete[: i + 1]) for i in range(len(complete))]
    steps = [i for i in range(len(best)) if i in (0, len(best) - 1) or best[i] != best[i - 1]]
    assert history[1]["x"] == [complete[i]["number"] for i in steps]
    assert history[1]["y"] == pytest.approx([best[i] for i in steps])
    assert history[1]["y"][-1] == pytest.approx(finished["best_trial"]["value"])

    check_intermediate(page, server, finished["id"], len(items))
    check_parallel(page, complete, ["val_accuracy"])
    check_slices(page, complete)
    check_importance(page, server, finished["id"])
    check_flatness(page, complete)
    assert chart(page, "pareto") is None
    assert "Single-objective" in page.locator("#chart-pareto-state").inner_text()

    rows = page.locator("#trial-table tbody tr")
    assert rows.count() == len(items)
    assert page.locator("#study-status").inner_text() == "completed"
    assert f"#{finished['best_trial']['number']}" in page.locator("#study-best").inner_text()
    # Sorting: a click on "#" turns the default (newest first) around.
    assert rows.first.get_attribute("data-number") == str(len(items) - 1)
    page.locator('#trial-table th[data-key="number"]').click()
    assert rows.first.get_attribute("data-number") == "0"


def test_study_page_draws_the_pareto_front_of_a_two_objective_digits_study(
    server: LocalServer, flat_study: dict[str, Any], page: Any, tmp_path: Path
) -> None:
    items = trial_items(server, flat_study["id"])
    complete = [t for t in items if t["state"] == "complete"]
    assert len(complete) == len(items) == 6
    page.goto(f"{server.url}/studies/{flat_study['id']}")
    wait_charts(page, CHART_KEYS)

    pareto = {tr["name"]: tr for tr in chart(page, "pareto")}
    assert set(pareto) == {"trials", "Pareto front"}
    front = {t["number"] for t in flat_study["best_trials"]}
    assert front, flat_study
    drawn = {name: sorted(int(s.split()[-1]) for s in tr["text"]) for name, tr in pareto.items()}
    assert drawn["Pareto front"] == sorted(front)
    assert drawn["trials"] == sorted(t["number"] for t in complete if t["number"] not in front)
    for tr in pareto.values():
        assert len(tr["x"]) == len(tr["y"]) == len(tr["text"])
        values = {t["number"]: [objective(t, 0), objective(t, 1)] for t in complete}
        for x, y, text in zip(tr["x"], tr["y"], tr["text"], strict=True):
            assert [x, y] == pytest.approx(values[int(text.split()[-1])])
    # The front is drawn as a line in increasing accuracy.
    assert pareto["Pareto front"]["x"] == sorted(pareto["Pareto front"]["x"])

    history = chart(page, "history")
    assert [tr["name"] for tr in history] == ["val_accuracy", "sharpness"]
    for i, tr in enumerate(history):
        assert tr["x"] == [t["number"] for t in complete]
        assert tr["y"] == pytest.approx([objective(t, i) for t in complete])

    check_intermediate(page, server, flat_study["id"], len(items))
    check_parallel(page, complete, ["val_accuracy", "sharpness"])
    check_slices(page, complete)
    check_importance(page, server, flat_study["id"])
    check_flatness(page, complete)
    assert "Pareto front" in page.locator("#study-best").inner_text()
    shot(page, tmp_path, "study.png")


def test_a_trial_finishing_during_the_visit_appears_without_a_reload(
    server: LocalServer, page: Any
) -> None:
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


def test_trial_page_shows_its_params_metrics_and_curves(
    server: LocalServer, finished: dict[str, Any], page: Any, tmp_path: Path
) -> None:
    detail = httpx.get(f"{server.url}/api/v1/studies/{finished['id']}/trials/0", timeout=30).json()
    assert detail["params"]["method"] == "tsam"
    rows = detail["intermediate"]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    page.goto(f"{server.url}/studies/{finished['id']}/trials/0")
    wait_charts(page, ("trial-curves",))
    drawn = {tr["name"]: tr for tr in chart(page, "trial-curves")}
    # Every metric the training reported per epoch, but the epoch, its time, lr and t.
    reported = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
    assert set(drawn) == reported - {"epoch", "epoch_time", "lr", "t"}
    assert {"val_accuracy", "val_loss", "step_loss", "tilted_loss"} <= set(drawn)
    for name, tr in drawn.items():
        assert tr["x"] == [r["epoch"] for r in rows], name
        assert tr["y"] == pytest.approx([r[name] for r in rows]), name
    params = page.locator("#trial-params").inner_text()
    assert all(k in params for k in ("method", "t", "rho", "lr"))
    metrics = page.locator("#trial-metrics").inner_text()
    assert all(k in metrics for k in ("test_accuracy", "sharpness", "loss_clean"))
    assert page.locator("#trial-state").inner_text() == detail["state"] == "complete"
    env = page.locator("#trial-env").inner_text()
    assert detail["env"]["runner"] == "train" and detail["env"]["node_id"] in env
    assert "pid" in env
    shot(page, tmp_path, "trial.png")


def test_unknown_pages_are_designed_404s(server: LocalServer, page: Any) -> None:
    response = page.goto(f"{server.url}/studies/nope")
    assert response.status == 404
    assert "No study" in page.locator("main").inner_text()


LARGE = 10_000
MAX_POINTS = 2000  # service/dashboard/static/common.js
ROWS_PER_PAGE = 100  # service/dashboard/static/study.js


@pytest.fixture(scope="module")
def large_study(server: LocalServer) -> str:
    """A finished study of 10,000 complete trials with two epochs each, written straight
    into the server's database (running them would take hours)."""
    from sqlalchemy import insert

    from service.trials.models import Trial, TrialMetric

    spec = sleep_spec("dashboard-10k", budget={"n_trials": LARGE, "max_parallel": 4})
    study_id = new_study_id()
    db = Database(server.database_url)
    try:
        with db.write() as session:
            study = Study(
                id=study_id,
                owner="local",
                name=spec["name"],
                spec=StudySpec.model_validate(spec).model_dump(mode="json"),
                status="completed",
                next_number=LARGE,
            )
            session.add(study)
            session.flush()
            rows = []
            for n in range(LARGE):
                value = 0.5 + 0.4 * math.sin(n / 97.0) ** 2
                rows.append(
                    {
                        "study_pk": study.pk,
                        "number": n,
                        "state": "complete",
                        "params": {
                            "t": 0.1 + n % 100,
                            "rho": 0.01 + (n % 7) / 20,
                            "samples": 1 + n % 8,
                        },
                        "attempts": 1,
                        "value": value,
                        "values": [value],
                        "metrics": {"val_accuracy": value, "test_accuracy": value},
                    }
                )
            session.execute(insert(Trial), rows)
            pks = session.execute(
                Trial.__table__.select()
                .with_only_columns(Trial.pk)
                .where(Trial.study_pk == study.pk)
            ).scalars()
            session.execute(
                insert(TrialMetric),
                [
                    {"trial_pk": pk, "epoch": e, "attempt": 1, "metrics": {"val_accuracy": e / 2}}
                    for pk in pks
                    for e in (1, 2)
                ],
            )
    finally:
        db.dispose()
    return study_id


def test_a_study_of_ten_thousand_trials_pages_its_table_and_downsamples_its_charts(
    server: LocalServer, page: Any, large_study: str
) -> None:
    page.goto(f"{server.url}/studies/{large_study}")
    page.wait_for_function(
        f"() => document.querySelectorAll('#trial-table tbody tr').length === {ROWS_PER_PAGE}"
    )
    wait_charts(page, ("history", "intermediate", "parallel", "slice"))
    assert page.locator("#trial-page").inner_text() == f"page 1 of {LARGE // ROWS_PER_PAGE}"
    page.locator("#trial-next").click()
    assert page.locator("#trial-page").inner_text() == f"page 2 of {LARGE // ROWS_PER_PAGE}"
    assert page.locator("#trial-table tbody tr").count() == ROWS_PER_PAGE
    assert "10000/10000 done" in page.locator("#study-progress").inner_text()

    history = chart(page, "history")
    assert points(history[0]) == MAX_POINTS  # every trial is complete: downsampled to the cap
    assert history[0]["x"][-1] == LARGE - 1  # the last trial is always kept
    intermediate = chart(page, "intermediate")
    drawn = sum(points(trace) for trace in intermediate)
    assert 0 < drawn <= MAX_POINTS
    parallel = chart(page, "parallel")
    assert 0 < len(parallel[0]["dimensions"][0]["values"]) <= MAX_POINTS
    for trace in chart(page, "slice"):
        assert 0 < points(trace) <= MAX_POINTS


def test_the_pages_work_offline_with_plotly_from_the_installed_package(
    server: LocalServer, browser: Any, finished: dict[str, Any]
) -> None:
    """Every request the three pages make goes to the server itself; anything else is
    refused and recorded, and the charts still draw."""
    from service.dashboard.router import plotly_js_path

    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    foreign: list[str] = []

    def only_the_server(route: Any) -> None:
        url = route.request.url
        requested.append(url)
        if url.startswith(server.url):
            route.continue_()
        else:
            foreign.append(url)
            route.abort()

    ctx.route("**/*", only_the_server)
    try:
        pg = ctx.new_page()
        for path in ("/", f"/studies/{finished['id']}", f"/studies/{finished['id']}/trials/0"):
            pg.goto(f"{server.url}{path}")
            pg.wait_for_load_state("networkidle")
        pg.goto(f"{server.url}/studies/{finished['id']}")
        wait_charts(pg, ("history", "intermediate"))
        assert len(chart(pg, "history")[0]["x"]) == finished["counts"]["complete"]
    finally:
        ctx.close()
    assert foreign == []
    vendor = [u for u in requested if u.endswith("plotly.min.js")]
    assert vendor, requested
    body = httpx.get(vendor[0], timeout=60).content
    assert body == plotly_js_path().read_bytes()
