"""Study storage: idempotent creation under concurrency, owner scoping, pagination."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from service.studies import service
from service.studies.models import Study
from service.studies.spec import StudySpec


def test_idempotent_study_creation_under_concurrency(db):
    spec = StudySpec(name="same")

    def create(_):
        return service.create_study(db, owner="local", spec=spec, idempotency_key="k1")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert len({study.id for study, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Study)).scalar_one() == 1


def test_the_same_key_for_another_owner_is_another_study(db):
    a, _ = service.create_study(db, owner="alice", spec=StudySpec(), idempotency_key="k")
    b, created = service.create_study(db, owner="bob", spec=StudySpec(), idempotency_key="k")
    assert created and a.id != b.id


def test_another_owners_study_is_not_found(db):
    study, _ = service.create_study(db, owner="alice", spec=StudySpec())
    with db.read() as s, pytest.raises(service.StudyNotFound):
        service.get_study(s, owner="bob", study_id=study.id)


def test_list_is_newest_first_and_paginates_without_gaps(db):
    ids = [
        service.create_study(db, owner="o", spec=StudySpec(name=f"s{i}"))[0].id for i in range(5)
    ]
    seen, cursor = [], None
    with db.read() as s:
        while True:
            page, cursor = service.list_studies(s, owner="o", status=None, limit=2, cursor=cursor)
            seen += [st.id for st in page]
            if cursor is None:
                break
    assert seen == ids[::-1]


def test_a_forged_cursor_is_rejected():
    with pytest.raises(ValueError):
        service.decode_cursor("bm90LWEtY3Vyc29y")
