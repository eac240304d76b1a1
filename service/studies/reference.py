"""The study spec reference (docs/spec.md), generated from the pydantic models so it cannot
drift from what the API accepts: a test compares the file with :func:`render`.

    .venv/bin/python -m service.studies.reference > docs/spec.md
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.studies import spec as s

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", s.StudySpec),
    ("task", s.TaskSpec),
    ("optimizer", s.OptimizerSpec),
    ("search_space.<key> (type: float)", s.FloatParam),
    ("search_space.<key> (type: int)", s.IntParam),
    ("search_space.<key> (type: categorical)", s.CategoricalParam),
    ("objective", s.ObjectiveSpec),
    ("sampler", s.SamplerSpec),
    ("pruner", s.PrunerSpec),
    ("budget", s.BudgetSpec),
    ("resources", s.ResourcesSpec),
    ("runner", s.RunnerSpec),
]


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(section defaults)"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`" if field.default is not None else "`null`"


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
        for attr in ("min_length", "max_length"):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{attr.replace('_', ' ')} {value}")
    return ", ".join(parts)


def _strip_annotated(text: str) -> str:
    """``Annotated[X, metadata...]`` -> ``X`` (metadata reprs hold addresses, not types)."""
    while "Annotated[" in text:
        start = text.index("Annotated[")
        first = end = start + len("Annotated[")
        depth, comma = 0, None
        while depth > 0 or text[end] not in "])":
            if text[end] in "[(":
                depth += 1
            elif text[end] in "])":
                depth -= 1
            elif text[end] == "," and depth == 0 and comma is None:
                comma = end
            end += 1
        text = text[:start] + text[first : comma or end] + text[end + 1 :]
    return text


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("service.studies.spec.", "")
    text = _strip_annotated(text.replace("<class '", "").replace("'>", ""))
    return text.replace("|", "\\|")


def render() -> str:
    lines = [
        "# Study spec reference",
        "",
        "Generated from the pydantic models in `service/studies/spec.py`",
        "(`python -m service.studies.reference > docs/spec.md`); a test keeps it current.",
        'Unknown keys are rejected everywhere (`extra="forbid"`).',
        "",
        f"Searchable keys: {', '.join(f'`{k}`' for k in s.SEARCHABLE_KEYS)}.",
        "Method-specific keys are searched only for the methods that use them: "
        + "; ".join(f"`{k}`: {', '.join(sorted(v))}" for k, v in s.METHOD_KEYS.items())
        + ".",
        "",
    ]
    for title, model in SECTIONS:
        lines += [f"## {title}", "", (model.__doc__ or "").strip().split("\n\n")[0], ""]
        lines += [
            "| field | type | default | bounds | description |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| `{name}` | {_type(field)} | {_default(field)} | {_bounds(field)} | {desc} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Any = None) -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
