"""The ``tsam`` commands that talk to a server over API v1, through :mod:`service.client`.

Every command takes ``--url`` (or ``TSAM_URL``; default http://127.0.0.1:8000) and ``--token``
(or ``TSAM_TOKEN``). Exit codes: 0 on success; 2 for bad input (a 422 from the server, a spec
file that cannot be read, a bad option); 1 for anything else (an unknown study, a conflict, a
server error, a server that cannot be reached) -- and 1 when a watched study ends failed or
cancelled. Errors print the server's message on stderr.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.cli import BAD_INPUT, app, console, err_console, fail
from service.client import (
    DEFAULT_URL,
    FINISHED_STATUSES,
    ApiError,
    Client,
    ExportExists,
    SpecError,
    ValidationFailed,
    progress_of,
)

UrlOpt = Annotated[str, typer.Option("--url", envvar="TSAM_URL", help="Server URL (env TSAM_URL).")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="TSAM_TOKEN", help="Bearer token (env TSAM_TOKEN)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
StudyArg = Annotated[str, typer.Argument(help="Study id.", show_default=False)]


@contextmanager
def remote(url: str, token: str | None) -> Iterator[Client]:
    """A client whose errors become exits: 2 for bad input, 1 for the rest."""
    try:
        with Client(url, token=token) as client:
            yield client
    except ValidationFailed as err:
        raise fail(err.message, BAD_INPUT) from err
    except SpecError as err:
        raise fail(str(err), BAD_INPUT) from err
    except ApiError as err:
        status = f" ({err.status})" if err.status else ""
        raise fail(f"{err.message}{status}") from err
    except ExportExists as err:
        raise fail(str(err)) from err


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _params(params: dict[str, Any]) -> str:
    """``k=v ...``, escaped for Rich markup."""
    return escape(" ".join(f"{k}={_fmt(v)}" for k, v in params.items()))


def studies_table(items: list[dict[str, Any]]) -> Table:
    table = Table(show_header=True, header_style="bold")
    for column in ("id", "name", "status", "trials", "best", "created"):
        table.add_column(column, justify="right" if column in ("trials", "best") else "left")
    for s in items:
        done, total = progress_of(s)
        best = (s.get("best_trial") or {}).get("value")
        table.add_row(
            s["id"],
            escape(s["name"]),
            s["status"],
            f"{done}/{total}",
            _fmt(best),
            s["created_at"][:19],
        )
    return table


def trials_table(items: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    for column in ("#", "state", "value", "params", "attempts", "source"):
        table.add_column(
            column, justify="right" if column in ("#", "value", "attempts") else "left"
        )
    for t in items:
        table.add_row(
            str(t["number"]),
            t["state"],
            _fmt(t["value"]),
            _params(t["params"]),
            str(t["attempts"]),
            t.get("source", ""),
        )
    return table


def best_of(
    study: dict[str, Any], trials: list[dict[str, Any]], n: int = 5
) -> list[dict[str, Any]]:
    """The ``n`` best complete trials by the (first) objective."""
    objective = study["spec"].get("objective", {})
    first = objective[0] if isinstance(objective, list) else objective
    maximize = first.get("direction", "maximize") == "maximize"
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    return sorted(done, key=lambda t: t["value"], reverse=maximize)[:n]


def watch_study(client: Client, study_id: str, poll_s: float) -> dict[str, Any]:
    """Live progress bar and best-trials table until the study finishes; the final study."""
    study = client.get(study_id)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err_console,
    )
    task = progress.add_task(f"{escape(study['name'])} ({study_id})", total=None, status="")
    with Live(Group(progress), console=err_console, refresh_per_second=4) as live:
        while True:
            done, total = progress_of(study)
            progress.update(task, completed=done, total=total, status=study["status"])
            best = best_of(study, client.all_trials(study_id))
            live.update(Group(progress, trials_table(best, title="best trials")))
            if study["status"] in FINISHED_STATUSES:
                return study
            time.sleep(poll_s)
            study = client.get(study_id)


def finished_exit(study: dict[str, Any]) -> None:
    """Exit 1 unless the study completed."""
    if study["status"] != "completed":
        detail = f": {study['error']}" if study.get("error") else ""
        raise fail(f"study {study['id']} {study['status']}{detail}")
    err_console.print(f"study {study['id']} completed")


@app.command("submit")
def submit_command(
    spec: Annotated[Path, typer.Argument(help="Study spec, YAML or JSON.", show_default=False)],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    validate_only: Annotated[
        bool, typer.Option("--validate-only", help="Validate; print the normalized spec.")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Watch it until it ends.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="A retry returns the same study.")
    ] = None,
    poll_s: Annotated[float, typer.Option(min=0.05, help="Seconds between polls.")] = 1.0,
) -> None:
    """Submit a study and print its id (with --watch: exit 0 when it completes, 1 otherwise)."""
    with remote(url, token) as client:
        if validate_only:
            echo_json(client.validate(spec))
            err_console.print("spec is valid")
            return
        study = client.create(spec, idempotency_key=idempotency_key)
        typer.echo(study["id"])
        if watch:
            finished_exit(watch_study(client, study["id"], poll_s))


@app.command("ls")
def ls_command(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    status: Annotated[str | None, typer.Option(help="Only studies with this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Studies per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List your studies, newest first."""
    with remote(url, token) as client:
        page = client.list_studies(status=status, limit=limit, cursor=cursor)
    if as_json:
        echo_json(page)
        return
    console.print(studies_table(page["items"]))
    if page["next_cursor"]:
        err_console.print(f"more: --cursor {page['next_cursor']}")


@app.command("show")
def show_command(
    study_id: StudyArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One study: status, budget, trial counts, best trial."""
    with remote(url, token) as client:
        study = client.get(study_id)
    if as_json:
        echo_json(study)
        return
    done, total = progress_of(study)
    budget = study["spec"].get("budget", {})
    counts = ", ".join(f"{k} {v}" for k, v in sorted(study["counts"].items())) or "none"
    lines = [
        f"[bold]{escape(study['name'])}[/] ({study['id']})  {study['status']}",
        f"trials   {done}/{total} finished  ({counts})",
        "budget   " + ", ".join(f"{k}={_fmt(v)}" for k, v in budget.items()),
        f"priority {study['priority']}",
    ]
    best = study.get("best_trial")
    if best:
        lines.append(
            f"best     #{best['number']} value={_fmt(best['value'])}  {_params(best['params'])}"
        )
    if study.get("error"):
        lines.append(f"error    {escape(study['error'])}")
    console.print("\n".join(lines), highlight=False)


@app.command("trials")
def trials_command(
    study_id: StudyArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    state: Annotated[str | None, typer.Option(help="Only trials in this state.")] = None,
    after: Annotated[int | None, typer.Option(help="Only trials numbered above this.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Trials per page.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """One page of a study's trials by number (--after for the next)."""
    with remote(url, token) as client:
        page = client.trials(study_id, state=state, after=after, limit=limit)
    if as_json:
        echo_json(page)
        return
    console.print(trials_table(page["items"]))
    if page["next_after"] is not None:
        err_console.print(f"more: --after {page['next_after']}")


@app.command("watch")
def watch_command(
    study_id: StudyArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    poll_s: Annotated[float, typer.Option(min=0.05, help="Seconds between polls.")] = 1.0,
) -> None:
    """Live progress and best trials until the study ends (exit 1 if it failed or was
    cancelled)."""
    with remote(url, token) as client:
        finished_exit(watch_study(client, study_id, poll_s))


def _verb(name: str, study_id: str, url: str, token: str | None) -> None:
    with remote(url, token) as client:
        study = getattr(client, name)(study_id)
    console.print(f"study {study['id']}: {study['status']}", highlight=False)


@app.command("pause")
def pause_command(study_id: StudyArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Start no new trials; running ones finish."""
    _verb("pause", study_id, url, token)


@app.command("resume")
def resume_command(study_id: StudyArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Continue a paused study."""
    _verb("resume", study_id, url, token)


@app.command("cancel")
def cancel_command(study_id: StudyArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """End a study; its running trials are cancelled."""
    _verb("cancel", study_id, url, token)


@app.command("delete")
def delete_command(study_id: StudyArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Remove a finished study and its trials."""
    with remote(url, token) as client:
        client.delete(study_id)
    console.print(f"study {study_id}: deleted", highlight=False)


@app.command("budget")
def budget_command(
    study_id: StudyArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    n_trials: Annotated[int | None, typer.Option(help="Trials to make in all.")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="Trials at once.")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Study wall-clock limit.")] = None,
    trial_timeout_s: Annotated[float | None, typer.Option(help="Per-attempt limit.")] = None,
    max_failures: Annotated[int | None, typer.Option(help="Failures that fail it.")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
) -> None:
    """Change a running study's budget or priority."""
    budget = {
        k: v
        for k, v in {
            "n_trials": n_trials,
            "max_parallel": max_parallel,
            "timeout_s": timeout_s,
            "trial_timeout_s": trial_timeout_s,
            "max_failures": max_failures,
        }.items()
        if v is not None
    }
    if not budget and priority is None:
        raise fail(
            "nothing to change: pass --n-trials, --max-parallel, ... or --priority", BAD_INPUT
        )
    with remote(url, token) as client:
        study = client.patch(study_id, budget=budget or None, priority=priority)
    console.print(
        f"study {study['id']}: budget "
        + ", ".join(f"{k}={_fmt(v)}" for k, v in study["spec"]["budget"].items())
        + f", priority {study['priority']}",
        highlight=False,
    )


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values as YAML scalars (``3`` -> 3, ``sam`` -> "sam"); ``inf``
    stays the string "inf", which the server reads as infinity (JSON has no infinity)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise fail(f"expected key=value, got {pair!r}", BAD_INPUT)
        lowered = raw.strip().lower()
        if lowered in ("inf", "infinity", ".inf"):
            value: Any = "inf"
        else:
            try:
                value = yaml.safe_load(raw) if raw else ""
            except yaml.YAMLError:
                value = raw
        out[key.strip()] = value
    return out


@app.command("enqueue")
def enqueue_command(
    study_id: StudyArg,
    params: Annotated[list[str], typer.Argument(help="key=value ...", show_default=False)],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Enqueue a trial with fixed params (e.g. `method=sam rho=0.05`); it runs before new
    sampler trials. Prints its number."""
    fixed = parse_params(params)
    with remote(url, token) as client:
        trial = client.enqueue(study_id, fixed)
    typer.echo(trial["number"])


@app.command("export")
def export_command(
    study_id: StudyArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    format: Annotated[str, typer.Option("--format", help="csv | json")] = "csv",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write (default stdout).")
    ] = None,
    optuna_storage: Annotated[
        str | None,
        typer.Option(help="Write an Optuna study into this storage URL instead."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an Optuna study of the same name.")
    ] = False,
) -> None:
    """Every trial as CSV or JSON, or into an Optuna storage (sqlite:///optuna.db, ...)."""
    if format not in ("csv", "json"):
        raise fail(f"--format must be csv or json, got {format!r}", BAD_INPUT)
    with remote(url, token) as client:
        if optuna_storage is not None:
            try:
                study = client.export_optuna(study_id, optuna_storage, overwrite=overwrite)
            except (ApiError, ExportExists):
                raise
            except Exception as err:  # the storage's own errors: a bad URL, a locked file
                raise fail(f"cannot write to {optuna_storage}: {err}") from err
            err_console.print(
                f"wrote {len(study.trials)} trials to Optuna study {study.study_name!r} "
                f"in {optuna_storage}",
                highlight=False,
            )
            return
        data = client.export(study_id, "json" if format == "json" else "csv")
    text = json.dumps(data, indent=2) + "\n" if format == "json" else str(data)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as err:
        raise fail(f"cannot write {output}: {err.strerror or err}", BAD_INPUT) from err
    err_console.print(f"wrote {output}", highlight=False)
