"""Every setting of the service in one place, from the environment (prefix ``TSAM_``).

TSAM_DATABASE_URL=postgresql+psycopg://user@db/tsam   # default: a SQLite file ./tsam.db
RAY_ADDRESS=ray://head:10001                          # unset: an embedded local Ray
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; each field can be set as ``TSAM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="TSAM_", extra="ignore")

    database_url: str = Field(
        "sqlite:///./tsam.db", description="SQLAlchemy URL: SQLite file or postgresql+psycopg://"
    )
    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: trials run as Ray tasks; local: threads in the server process"
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS", "TSAM_RAY_ADDRESS"),
        description="Ray cluster to join; unset starts an embedded local Ray",
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray")
    ray_warm_workers: int = Field(1, ge=0, description="workers that pre-import torch at start")
    ray_idle_worker_s: float = Field(
        60.0, gt=0, le=86_400, description="how long the embedded Ray keeps an idle worker"
    )
    local_slots: int = Field(2, ge=1, description="concurrent trials of the local executor")
    scheduler_tick_s: float = Field(
        1.0, gt=0, description="safety-net wake-up of the scheduler; events wake it sooner"
    )
    scheduler_batch_s: float = Field(
        0.005,
        ge=0,
        le=1,
        description="how long the scheduler lets a burst of trial reports gather before "
        "storing them in one write (a finished trial cuts the wait short)",
    )
    checkpoint_root: str = Field("./runs", description="where trials write their checkpoints")
    default_owner: str = Field("local", description="owner of every study while auth is off")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted")
    max_page_size: int = Field(1000, ge=1, description="largest page of a list endpoint")
    migrate_on_start: bool = Field(True, description="upgrade the schema to head when serving")
    git_revision: str | None = Field(None, description="recorded with each trial; auto-detected")


@lru_cache
def get_settings() -> Settings:
    return Settings()
