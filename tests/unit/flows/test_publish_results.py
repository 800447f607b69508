"""A report version's DICOM results when storing them fails for a while: tried again, not failed for good."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from service.errors import TransientError
from service.flows import queue, results
from service.flows.runtime import Runtime
from service.store import studies
from service.store.tables import Report
from tests.factories import reported_job_id


def test_a_database_outage_while_storing_the_sr_leaves_the_results_pending_for_a_retry(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)
    job_id = reported_job_id(runtime)
    real_add = studies.add_instance

    def database_gone(**kwargs: Any) -> Any:
        raise OperationalError("INSERT INTO instances ...", {}, Exception("server closed the connection"))

    monkeypatch.setattr(studies, "add_instance", database_gone)
    with pytest.raises(TransientError, match="storing a DICOM result failed"):  # Celery tries the task again
        results.publish_results(runtime, job_id)
    with runtime.sessions() as session:
        report = session.scalar(select(Report).where(Report.job_id == job_id))
        assert report is not None and (report.dicom_state, report.sr_sop_instance_uid) == ("pending", None)
    monkeypatch.setattr(studies, "add_instance", real_add)
    results.publish_results(runtime, job_id)
    with runtime.sessions() as session:
        report = session.scalar(select(Report).where(Report.job_id == job_id))
        assert report is not None and report.dicom_state == "stored" and report.sr_sop_instance_uid
