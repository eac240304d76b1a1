"""A typed, synchronous Python client of API v1 (DESIGN.md 3a), over httpx.

```python
from service.client import Client

with Client("http://127.0.0.1:8000") as client:
    handle = client.submit("examples/digits-tsam.yaml")
    study = handle.wait(progress=True)
    print(study["status"], handle.best_trial)
    frame = handle.dataframe()  # needs pandas
```

Every error the server answers raises an :class:`ApiError` carrying its status and message:
:class:`NotFound` (404), :class:`Conflict` (409), :class:`ValidationFailed` (422, with the
field errors in ``.errors``); a server that cannot be reached raises :class:`Unreachable`.
A spec file that cannot be read or parsed raises :class:`SpecError` before any request.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import httpx
import yaml

if TYPE_CHECKING:
    import optuna
    import pandas

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED_STATUSES = ("completed", "cancelled", "failed")
Json = dict[str, Any]


# -- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """The server answered an error (or could not be reached: ``status`` None)."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.detail = detail


class NotFound(ApiError):
    """404: no such study or trial (for this caller)."""


class Conflict(ApiError):
    """409: the study's status does not allow the call."""


class ValidationFailed(ApiError):
    """422: invalid input; ``errors`` lists ``{"loc", "msg", "type"}``."""

    @property
    def errors(self) -> list[Json]:
        return self.detail if isinstance(self.detail, list) else []


class Unreachable(ApiError):
    """No answer: connection refused, DNS, timeout."""


class SpecError(ValueError):
    """A spec file that cannot be read or is not a YAML/JSON mapping."""


class ExportExists(Exception):
    """The Optuna storage already holds a study of that name (pass ``overwrite=True``)."""


_ERRORS: dict[int, type[ApiError]] = {404: NotFound, 409: Conflict, 422: ValidationFailed}


def format_errors(errors: list[Json]) -> str:
    """``budget.n_trials: must be >= 1; ...`` from FastAPI-style errors (without ``body``)."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", [])]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        where = ".".join(loc)
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    message = format_errors(detail) if isinstance(detail, list) else str(detail)
    cls = _ERRORS.get(response.status_code, ApiError)
    raise cls(message or f"HTTP {response.status_code}", response.status_code, detail)


def load_spec(spec: Mapping[str, Any] | str | Path) -> Json:
    """A spec as a dict: a mapping as is, or the YAML/JSON file at a path."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"cannot read {path}: {err.strerror or err}") from err
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise SpecError(f"{path} is not valid {kind}: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping (the study spec)")
    return data


def jsonable(value: Any) -> Any:
    """``value`` with float infinities as the strings "inf"/"-inf" (JSON has no infinity;
    the server reads ``t: "inf"`` as SAM's limit)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# -- the client --------------------------------------------------------------------------------


class Client:
    """API v1 over HTTP. ``http`` replaces the httpx client it would build (e.g. FastAPI's
    ``TestClient``, which is one)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owned = http is None
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout)
        self.http.headers.update(headers)

    def close(self) -> None:
        if self._owned:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; raises the :class:`ApiError` that fits an error answer."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise Unreachable(f"cannot reach {self.url}: {err}") from err
        _raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- ops -----------------------------------------------------------------------------------
    def healthz(self) -> Json:
        result: Json = self._json("GET", "/healthz")
        return result

    def readyz(self) -> Json:
        """``{"ready", "checks"}``; a not-ready server (503) answers too, it does not raise."""
        try:
            response = self.http.get("/readyz")
        except httpx.TransportError as err:
            raise Unreachable(f"cannot reach {self.url}: {err}") from err
        if response.status_code not in (200, 503):
            _raise_for(response)
        result: Json = response.json()
        return result

    # -- studies -------------------------------------------------------------------------------
    def create(
        self,
        spec: Mapping[str, Any] | str | Path,
        *,
        validate_only: bool = False,
        idempotency_key: str | None = None,
    ) -> Json:
        """``POST /api/v1/studies``: the new (or replayed) study, or with ``validate_only``
        the normalized spec (nothing stored)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"validate_only": "true"} if validate_only else {}
        result: Json = self._json(
            "POST",
            "/api/v1/studies",
            json=jsonable(load_spec(spec)),
            params=params,
            headers=headers,
        )
        return result

    def validate(self, spec: Mapping[str, Any] | str | Path) -> Json:
        """The normalized spec (defaults filled in); raises :class:`ValidationFailed`."""
        return self.create(spec, validate_only=True)

    def submit(
        self, spec: Mapping[str, Any] | str | Path, *, idempotency_key: str | None = None
    ) -> StudyHandle:
        """Create a study and return a handle to wait on it."""
        return StudyHandle(self, self.create(spec, idempotency_key=idempotency_key))

    def study(self, study_id: str) -> StudyHandle:
        """A handle on an existing study."""
        return StudyHandle(self, self.get(study_id))

    def list_studies(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Json:
        """One page: ``{"items": [...], "next_cursor": ...}``, newest first."""
        params = {"status": status, "limit": limit, "cursor": cursor}
        result: Json = self._json(
            "GET", "/api/v1/studies", params={k: v for k, v in params.items() if v is not None}
        )
        return result

    def iter_studies(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Json]:
        """Every study of the caller, page after page."""
        cursor = None
        while True:
            page = self.list_studies(status=status, limit=page_size, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def get(self, study_id: str) -> Json:
        result: Json = self._json("GET", f"/api/v1/studies/{study_id}")
        return result

    def pause(self, study_id: str) -> Json:
        result: Json = self._json("POST", f"/api/v1/studies/{study_id}/pause")
        return result

    def resume(self, study_id: str) -> Json:
        result: Json = self._json("POST", f"/api/v1/studies/{study_id}/resume")
        return result

    def cancel(self, study_id: str) -> Json:
        result: Json = self._json("POST", f"/api/v1/studies/{study_id}/cancel")
        return result

    def delete(self, study_id: str) -> None:
        """Remove a finished study (:class:`Conflict` while it is not finished)."""
        self.request("DELETE", f"/api/v1/studies/{study_id}")

    def patch(
        self,
        study_id: str,
        *,
        budget: Mapping[str, Any] | None = None,
        priority: int | None = None,
    ) -> Json:
        """Change budget fields (n_trials, max_parallel, timeout_s, trial_timeout_s,
        max_failures) and/or the priority."""
        body: Json = {}
        if budget is not None:
            body["budget"] = dict(budget)
        if priority is not None:
            body["priority"] = priority
        result: Json = self._json("PATCH", f"/api/v1/studies/{study_id}", json=body)
        return result

    def set_budget(self, study_id: str, **fields: Any) -> Json:
        """``client.set_budget(sid, n_trials=64, max_parallel=4)``."""
        return self.patch(study_id, budget=fields)

    def enqueue(self, study_id: str, params: Mapping[str, Any]) -> Json:
        """A trial with fixed params (runs before new sampler trials); the trial item."""
        result: Json = self._json(
            "POST", f"/api/v1/studies/{study_id}/trials", json={"params": jsonable(dict(params))}
        )
        return result

    # -- trials --------------------------------------------------------------------------------
    def trials(
        self,
        study_id: str,
        *,
        state: str | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> Json:
        """One page: ``{"items": [...], "next_after": ...}`` by trial number."""
        params = {"state": state, "after": after, "limit": limit}
        result: Json = self._json(
            "GET",
            f"/api/v1/studies/{study_id}/trials",
            params={k: v for k, v in params.items() if v is not None},
        )
        return result

    def iter_trials(
        self,
        study_id: str,
        *,
        state: str | None = None,
        after: int | None = None,
        page_size: int = 500,
    ) -> Iterator[Json]:
        """Every trial (numbered above ``after``), page after page."""
        while True:
            page = self.trials(study_id, state=state, after=after, limit=page_size)
            yield from page["items"]
            after = page.get("next_after")
            if after is None:
                return

    def all_trials(self, study_id: str, *, state: str | None = None) -> list[Json]:
        return list(self.iter_trials(study_id, state=state))

    def trial(self, study_id: str, number: int) -> Json:
        """One trial with ``intermediate`` (per-epoch metrics), ``error`` and ``env``."""
        result: Json = self._json("GET", f"/api/v1/studies/{study_id}/trials/{number}")
        return result

    def export(self, study_id: str, format: Literal["csv", "json"] = "csv") -> Any:
        """Every trial flat: the CSV text, or the list of rows for ``json``."""
        response = self.request(
            "GET", f"/api/v1/studies/{study_id}/export", params={"format": format}
        )
        return response.json() if format == "json" else response.text

    def export_optuna(
        self,
        study_id: str,
        storage: str,
        *,
        overwrite: bool = False,
        study_name: str | None = None,
    ) -> optuna.Study:
        """Write the study into an Optuna storage (e.g. ``sqlite:///optuna.db``) as an Optuna
        study named after it: every finished trial with its params, distributions, values and
        intermediate values, so Optuna's own tools (dashboard, visualization) can read it.

        Params are what the study searched and the trial used (as the server tells its
        sampler); a trial's full params, number and final metrics are user attrs. Trials
        still waiting or running are left out. Raises :class:`ExportExists` when the storage
        already has a study of that name, unless ``overwrite``.
        """
        import optuna

        from service import search
        from service.studies.spec import StudySpec

        study = self.get(study_id)
        spec = StudySpec.model_validate(study["spec"])
        name = study_name or study["name"]
        if name in optuna.get_all_study_names(storage):
            if not overwrite:
                raise ExportExists(
                    f"{storage} already has an Optuna study named {name!r} (use overwrite)"
                )
            optuna.delete_study(study_name=name, storage=storage)
        target = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=[o.direction for o in spec.objectives],
        )
        target.set_user_attr("tsam_study_id", study["id"])
        target.set_user_attr("objectives", [o.metric for o in spec.objectives])
        dists = search.distributions(spec)
        single = len(spec.objectives) == 1
        states = {
            "complete": optuna.trial.TrialState.COMPLETE,
            "pruned": optuna.trial.TrialState.PRUNED,
            "failed": optuna.trial.TrialState.FAIL,
            "cancelled": optuna.trial.TrialState.FAIL,
        }
        for item in self.iter_trials(study_id):
            state = states.get(item["state"])
            if state is None:
                continue
            params = search.optuna_params(spec, item["params"])
            intermediate: dict[int, float] = {}
            if single and item["state"] in ("complete", "pruned"):
                metric = spec.objectives[0].metric
                for row in self.trial(study_id, item["number"])["intermediate"]:
                    value = row.get(metric)
                    if isinstance(value, int | float) and math.isfinite(value):
                        intermediate[int(row["epoch"])] = float(value)
            values = None
            if state == optuna.trial.TrialState.COMPLETE:
                values = item.get("values") or [item["value"]]
            target.add_trial(
                optuna.trial.create_trial(
                    state=state,
                    values=values,
                    params=params,
                    distributions={k: dists[k] for k in params},
                    intermediate_values=intermediate,
                    user_attrs={
                        "number": item["number"],
                        "state": item["state"],
                        "source": item.get("source"),
                        "params": item["params"],
                        "metrics": item.get("metrics"),
                    },
                )
            )
        return target


# -- a study being waited on -------------------------------------------------------------------


class StudyHandle:
    """A study on the server: wait for it, read its trials and best trial."""

    def __init__(self, client: Client, study: Json) -> None:
        self.client = client
        self.study = study
        self.id: str = study["id"]

    def __repr__(self) -> str:
        return f"StudyHandle(id={self.id!r}, status={self.status!r})"

    @property
    def status(self) -> str:
        return str(self.study["status"])

    @property
    def done(self) -> bool:
        return self.status in FINISHED_STATUSES

    def refresh(self) -> Json:
        self.study = self.client.get(self.id)
        return self.study

    @property
    def best_trial(self) -> Json | None:
        """The best complete trial as of the last refresh (None for multi-objective)."""
        best: Json | None = self.study.get("best_trial")
        return best

    def wait(
        self, progress: bool = False, poll_s: float = 1.0, timeout: float | None = None
    ) -> Json:
        """Poll until the study is completed, cancelled or failed and return it; with
        ``progress`` a Rich progress bar of finished trials out of ``n_trials`` (stderr).
        ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
            )
            bar.start()
            task = bar.add_task(self.study.get("name", self.id), total=None, status="")
        try:
            while True:
                study = self.refresh()
                if bar is not None:
                    finished, total = progress_of(study)
                    bar.update(task, completed=finished, total=total, status=study["status"])
                if self.done:
                    return study
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"study {self.id} is still {self.status}")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.stop()

    def trials(self, state: str | None = None) -> list[Json]:
        """Every trial (auto-paginated), as dicts."""
        return self.client.all_trials(self.id, state=state)

    def dataframe(self) -> pandas.DataFrame:
        """The flat export (one row per trial; ``param_*`` and ``metric_*`` columns) as a
        pandas DataFrame; ImportError when pandas is not installed."""
        try:
            import pandas
        except ImportError as err:
            raise ImportError(
                "StudyHandle.dataframe() needs pandas: pip install pandas "
                "(or use .trials() for plain dicts)"
            ) from err
        rows = self.client.export(self.id, "json")
        frame = pandas.DataFrame(rows)
        for column in ("started_at", "finished_at"):
            if column in frame:
                frame[column] = pandas.to_datetime(frame[column])
        return frame

    def pause(self) -> Json:
        self.study = self.client.pause(self.id)
        return self.study

    def resume(self) -> Json:
        self.study = self.client.resume(self.id)
        return self.study

    def cancel(self) -> Json:
        self.study = self.client.cancel(self.id)
        return self.study


def progress_of(study: Json) -> tuple[int, int]:
    """``(finished trials, n_trials)`` of a study as the API reads it."""
    counts: dict[str, int] = study.get("counts", {})
    finished = sum(n for state, n in counts.items() if state not in ("waiting", "running"))
    n_trials = int(study.get("spec", {}).get("budget", {}).get("n_trials", 0))
    return finished, max(n_trials, sum(counts.values()))
