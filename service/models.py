"""All tables, imported in one place so ``Base.metadata`` is complete (Alembic, tests)."""

from service.db import Base
from service.studies.models import Study
from service.trials.models import Trial, TrialMetric

__all__ = ["Base", "Study", "Trial", "TrialMetric"]
