"""The ``tsam`` command line (Typer + Rich).

Exit codes follow the usual convention of CLIs of this kind: 0 on success, 2 for bad input (an
unreadable or invalid file, a bad option), 1 for anything else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    name="tsam",
    help="Hyperparameter sweeps for Tilted SAM: train, serve, submit and watch studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

BAD_INPUT = 2


@app.callback()
def _root() -> None:
    """Hyperparameter sweeps for Tilted SAM (TSAM)."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping from ``path``; exit 2 when unreadable or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise fail(f"cannot read {path}: {err.strerror}", BAD_INPUT) from err
    except yaml.YAMLError as err:
        raise fail(f"{path} is not valid YAML: {err}", BAD_INPUT) from err
    if not isinstance(data, dict):
        raise fail(f"{path} must hold a mapping of settings", BAD_INPUT)
    return data


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as YAML scalars (``3`` -> 3, ``inf`` -> inf)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise fail(f"expected key=value, got {pair!r}", BAD_INPUT)
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, str) and value.lower() in ("inf", "infinity"):
            value = math.inf
        out[key.strip()] = value
    return out


@app.command("train")
def train_command(
    config_file: Annotated[
        Path,
        typer.Argument(help="YAML with training settings (flat, or task:/optimizer: sections)."),
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: key=value.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the final metrics as JSON.")
    ] = False,
) -> None:
    """Run one training locally with a progress bar and print its final metrics."""
    from tsam_core.config import TrainConfig
    from tsam_core.train import train

    data = read_yaml(config_file)
    data.update(parse_assignments(set_ or []))
    try:
        config = TrainConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise fail(f"invalid training config: {err}", BAD_INPUT) from err

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, disable=as_json) as progress:
        task = progress.add_task(
            f"{config.method} on {config.dataset}", total=config.epochs, status=""
        )

        def report(epoch: int, metrics: dict[str, float]) -> None:
            status = f"val_acc {metrics['val_accuracy']:.3f}  loss {metrics['step_loss']:.3f}"
            progress.update(task, completed=epoch, status=status)

        try:
            result = train(config, report)
        except ValueError as err:
            raise fail(str(err), BAD_INPUT) from err
    if as_json:
        typer.echo(json.dumps(result.metrics, indent=2, sort_keys=True))
        return
    table = Table(title=f"{config.method} · {config.model} on {config.dataset}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(result.metrics):
        table.add_row(key, f"{result.metrics[key]:.4g}")
    console.print(table)


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    migrate: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Upgrade the schema to head first.")
    ] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the API, the dashboard and the scheduler (one process; SQLite needs just one)."""
    import logging

    import uvicorn

    from service.app import SchemaBehind, create_app, prepare_database
    from service.settings import Settings

    settings = Settings(migrate_on_start=migrate)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        prepare_database(settings).dispose()  # fail fast, before binding the port
    except SchemaBehind as err:
        raise fail(str(err)) from err
    where = f" at {settings.ray_address}" if settings.ray_address else ""
    console.print(
        f"tsam-sweep on http://{host}:{port}  (database {settings.database_url}, "
        f"executor {settings.executor}{where})"
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, workers=1)


# The commands that talk to a server (submit, ls, watch, ...) register themselves on ``app``.
from service import cli_remote  # noqa: E402, F401

if __name__ == "__main__":
    app()
