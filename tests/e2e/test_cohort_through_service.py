"""The synthetic cohort (real DICOM files, FHIR Bundles in mixed units) through the service, as a PACS and EHR would."""

from __future__ import annotations

import math

from fastapi.testclient import TestClient

from service.training.cohort_files import make_patient_case
from tests.conftest import Tokens
from tests.e2e.test_embedded_spine import post_study, wait_for_report


def test_cohort_patients_are_joined_converted_and_reported(client: TestClient, tokens: Tokens) -> None:
    cases = [
        make_patient_case(7, index=i, size=1024, photometric_interpretation=p)
        for i, p in enumerate(["MONOCHROME1", "MONOCHROME2"])
    ]
    for case in cases:
        assert post_study(client, tokens, [case.dicom]).status_code == 200
        response = client.post("/fhir", json=case.bundle, headers=tokens.header("ingest"))
        assert response.status_code == 200, response.text
        analyze = client.post(f"/v1/studies/{case.study_instance_uid}/analyze", headers=tokens.header("clinician"))
        assert analyze.status_code == 202
    for case in cases:
        [report] = wait_for_report(client, case.study_instance_uid, tokens.header("clinician"))["reports"]
        assert report["patient"] is not None
        used = {v["feature"]: v for v in report["clinical_inputs"]}
        for feature, value in case.clinical.items():
            if feature not in used or feature in ("age", "sex") or value is None or feature in case.stale:
                continue
            assert not used[feature]["missing"], feature
            assert math.isclose(used[feature]["value"], value, rel_tol=1e-6), (feature, case.ucum_units.get(feature))
        for feature in case.stale:
            if feature in used and case.clinical.get(feature) is not None:
                assert used[feature]["missing"] and used[feature]["reason"] == "outside lookback window"
