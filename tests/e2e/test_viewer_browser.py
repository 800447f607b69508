"""The viewer in a real browser (Debian's chromium, driven by playwright) over the embedded default served by
uvicorn: sign in with a token, the worklist, a reported study (findings, intended use, image, heatmap toggle),
sign out; a refused token and a role without access; the operations page for an admin. Any console error or
Content-Security-Policy violation fails the test."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from service.config import Settings
from service.flows.runtime import Runtime
from tests.conftest import REQUIRE_SERVICES, Tokens, free_port, make_settings, serve_over_http
from tests.factories import dx_instance, multipart_related, patient_bundle

pytestmark = pytest.mark.slow

HOSTILE_NAME = '<b>Zoë</b> <img src=x onerror="window.__xss=1">'

# Recorded in the page before any of its scripts run: what the CSP refused, which the console may not show.
_CSP_PROBE = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(event.violatedDirective + " " + event.blockedURI);
});
"""


def _chromium() -> str:
    """Debian's chromium and the playwright package, or skip (fail with CLINFER_REQUIRE_SERVICES=1)."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    missing = None
    if not Path(path).is_file():
        missing = "chromium is not installed (make install installs it with apt-get)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is not installed (the dev extra)"
    if missing:
        if REQUIRE_SERVICES:
            pytest.fail(missing + " (CLINFER_REQUIRE_SERVICES=1)")
        pytest.skip(missing)
    return path


def _reported_study(base: str, tokens: Tokens) -> tuple[str, dict[str, Any]]:
    """A chest radiograph and its patient's Bundle sent, analyzed and reported with its DICOM results."""
    study_uid = generate_uid()
    with httpx.Client(base_url=base, timeout=90) as http:
        bundle = patient_bundle()
        bundle["entry"][0]["resource"]["name"] = [{"text": HOSTILE_NAME}]  # names are untrusted input
        assert http.post("/fhir", json=bundle, headers=tokens.header("ingest")).status_code == 200
        body, content_type = multipart_related([dx_instance(study_uid=study_uid)])
        stored = http.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
        )
        assert stored.status_code == 200, stored.text
        clinician = tokens.header("clinician")
        assert http.post(f"/v1/studies/{study_uid}/analyze", headers=clinician).status_code == 202
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            answer = http.get(f"/v1/studies/{study_uid}/report", params={"wait": 10}, headers=clinician)
            if answer.status_code == 200 and answer.json()["reports"][0]["dicom"]["state"] in ("stored", "failed"):
                [report] = answer.json()["reports"]
                assert report["dicom"]["state"] == "stored", report["dicom"]
                return study_uid, report
            time.sleep(0.2)
    raise AssertionError("the study was not reported within 90 s")


class Console:
    """Console errors and CSP violations of a page; ``allowed`` patterns may be expected for a while."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.allowed: tuple[str, ...] = ()
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _message(self, message: Any) -> None:
        if message.type == "error" and not any(pattern in message.text for pattern in self.allowed):
            self.errors.append(message.text)

    def check(self) -> None:
        violations = self.page.evaluate("window.__cspViolations || []")
        assert violations == [], f"Content-Security-Policy violations: {violations}"
        assert self.errors == [], f"browser console errors: {self.errors}"


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Chest radiographs to cxr-fusion, their results pushed to a PACS that is down (one try): a failed push for
    the operations page to show and send again."""
    rules = tmp_path / "routing.yaml"
    rules.write_text(
        f"""
destinations:
  pacs: {{kind: dimse, host: 127.0.0.1, port: {free_port()}, ae_title: PACS, timeout_seconds: 2}}
rules:
  - {{name: chest, match: {{Modality: [DX]}}, models: [cxr-fusion], destinations: [pacs]}}
"""
    )
    return make_settings(tmp_path, routing_rules=rules, delivery_max_attempts=1)


def _failed_pushes(base: str, tokens: Tokens, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = httpx.get(base + "/v1/deliveries", params={"state": "failed"}, headers=tokens.header("admin"))
        if len(found.json()["deliveries"]) >= count:
            return list(found.json()["deliveries"])
        time.sleep(0.2)
    raise AssertionError(f"{count} pushes to the PACS that is down did not fail within 60 s")


def _sign_in(page: Any, token: str) -> None:
    page.get_by_label("Bearer token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_a_clinician_reads_a_report_and_an_admin_watches_operations(
    browser: Any, runtime: Runtime, tokens: Tokens
) -> None:
    from playwright.sync_api import expect

    with serve_over_http(runtime) as base:
        study_uid, report = _reported_study(base, tokens)
        body, content_type = multipart_related([dx_instance(patient_id="MRN-2002", seed=3)])
        unreported = httpx.post(
            base + "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
        )
        assert unreported.status_code == 200, unreported.text
        clinician = tokens.header("clinician")["Authorization"].split()[1]
        admin = tokens.header("admin")["Authorization"].split()[1]
        ingest = tokens.header("ingest")["Authorization"].split()[1]

        context = browser.new_context()
        context.add_init_script(_CSP_PROBE)
        page = context.new_page()
        page.set_default_timeout(30_000)
        console = Console(page)

        page.goto(base + "/")
        assert page.url == base + "/ui/"
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

        # a token the service refuses (401): back to sign-in, with a message, and no token kept
        console.allowed = ("status of 401",)
        _sign_in(page, "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.bm90LWEtc2lnbmF0dXJl")
        expect(page.get_by_role("alert")).to_contain_text("refused the token")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('clinfer.token')") is None

        # a role that may not read studies (403): said so
        console.allowed = ("status of 403",)
        _sign_in(page, ingest)
        expect(page.get_by_role("alert")).to_contain_text("Your role may not see this")
        page.get_by_role("button", name="Sign out").click()
        console.allowed = ()

        # the clinician: worklist, then the study
        _sign_in(page, clinician)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        row = page.get_by_role("row").filter(has_text="MRN-1001")
        expect(row).to_have_count(1)
        expect(row).to_contain_text("DX")
        expect(row).to_contain_text("reported")
        assert page.evaluate("sessionStorage.getItem('clinfer.token')") == clinician
        row.get_by_role("link", name="MRN-1001").click()
        assert page.url.endswith(f"#/studies/{study_uid}")

        findings = page.locator("table.findings tbody tr")
        expect(findings).to_have_count(5)
        for finding in report["findings"]:
            expect(page.locator("table.findings")).to_contain_text(finding["display"])
        notice = page.get_by_role("note")
        expect(notice).to_contain_text("not for clinical use")
        expect(notice).to_contain_text("cxr-fusion")
        expect(page.locator("#report")).to_contain_text("CPUExecutionProvider")
        expect(page.locator("#report")).to_contain_text("preliminary, version 1")
        expect(page.get_by_role("table", name="Clinical inputs used")).to_contain_text("LOINC")
        facts = page.locator("#study-facts")
        expect(facts).to_contain_text(HOSTILE_NAME + ", male")  # the FHIR Patient, read for the page, as text
        expect(facts.locator("img, b")).to_have_count(0)
        assert page.evaluate("window.__xss") is None

        image = page.locator("#study-image")
        expect(image).to_be_visible()
        page.wait_for_function("() => document.getElementById('study-image').naturalWidth > 0")
        assert page.evaluate("document.getElementById('study-image').src").startswith("blob:")
        toggle = page.get_by_label("Show the AI heatmap overlay")
        expect(toggle).to_be_enabled()
        heatmap = page.locator("#heatmap-image")
        expect(heatmap).to_be_hidden()
        toggle.check()
        expect(heatmap).to_be_visible()
        assert page.evaluate("document.getElementById('heatmap-image').naturalWidth") > 0
        toggle.uncheck()
        expect(heatmap).to_be_hidden()

        page.get_by_role("button", name="Show the FHIR DiagnosticReport").click()
        expect(page.get_by_label("FHIR DiagnosticReport")).to_contain_text('"resourceType": "DiagnosticReport"')
        with page.expect_download() as download:
            page.get_by_role("button", name="Download the DICOM SR").click()
        sr = Path(download.value.path()).read_bytes()
        assert sr[128:132] == b"DICM" and report["dicom"]["sr"]["sop_instance_uid"].encode() in sr

        # a study without a report: its image, and an analysis requested from the page
        page.get_by_role("link", name="Back to the worklist").click()
        page.get_by_role("row").filter(has_text="MRN-2002").get_by_role("link", name="MRN-2002").click()
        expect(page.locator("#analyze-text")).to_contain_text("no AI report")
        page.wait_for_function("() => document.getElementById('study-image').naturalWidth > 0")
        expect(page.get_by_label("Show the AI heatmap overlay")).to_be_disabled()
        page.get_by_role("button", name="Request analysis").click()
        expect(page.locator("table.findings tbody tr")).to_have_count(5, timeout=60_000)
        expect(page.get_by_role("note")).to_contain_text("not for clinical use")

        page.get_by_role("link", name="Back to the worklist").click()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.keyboard.press("Tab")  # the page is usable from the keyboard: focus moves to the skip link

        assert "ACC" not in page.title(), "no patient data in the title, which browsers keep in their history"
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
        expect(page.locator("#worklist")).to_be_hidden()
        markup = page.content()  # what the pages showed left the page too, not only the screen
        assert "MRN-1001" not in markup and "MRN-2002" not in markup and "Pneumonia" not in markup
        assert page.evaluate("document.getElementById('study-image').getAttribute('src')") is None
        console.check()

        # a cut link (bad percent-encoding in the fragment): the worklist, not a blank page
        _sign_in(page, clinician)
        page.goto(base + "/ui/#/studies/%E0%A4%A")
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.get_by_role("button", name="Sign out").click()
        console.check()

        # the operations page, for an admin
        page.goto(base + "/ui/ops")
        _sign_in(page, admin)
        expect(page.get_by_role("heading", name="Operations")).to_be_visible()
        models = page.get_by_role("table", name="Models")
        expect(models).to_contain_text("cxr-fusion")
        expect(models.get_by_role("row").filter(has_text="cxr-fusion")).to_contain_text("CPUExecutionProvider")
        states = page.get_by_role("table", name="Jobs by state")
        expect(states.get_by_role("row").filter(has_text="succeeded")).to_contain_text("2")
        expect(page.get_by_role("table", name="Recent failed jobs")).to_contain_text("No failed jobs.")
        pushes = _failed_pushes(base, tokens, 2)  # the two studies analyzed, each with its report's results
        page.get_by_role("button", name="Refresh").click()
        table = page.get_by_role("table", name="Result pushes to destinations")
        row = table.get_by_role("row").filter(has_text=pushes[0]["study_instance_uid"])
        expect(row).to_contain_text("failed")
        expect(row).to_contain_text("could not be reached")
        page.get_by_role("button", name="Send the failed pushes again").click()
        expect(page.locator("#retry-result")).to_have_text("2 pushes sent again.")
        console.check()
        context.close()
