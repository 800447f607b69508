// The clinician viewer: a worklist of studies and, per study, its AI report and image (with the heatmap).
// Pages are chosen by the URL's fragment: "#/" (worklist, "#/?offset=25" for later pages) and
// "#/studies/<Study Instance UID>".

import {
  ApiError,
  api,
  apiJson,
  blobUrl,
  boot,
  clear,
  el,
  formatDateTime,
  report,
  revokeBlobUrls,
  say,
  show,
} from "./common.js";

const PAGE_SIZE = 25;
const VIEWPORT = "1024,1024";
const UID = /^[0-9]+(\.[0-9]+)*$/;
const PATIENT_REFERENCE = /^Patient\/[A-Za-z0-9.-]{1,64}$/;
const ACTIVE = ["queued", "preprocessing", "inferring"]; // job states of an analysis still running

let generation = 0; // bumped on each navigation: a page still loading drops what it fetched for the last one

const $ = (id) => document.getElementById(id);

function pages() {
  return document.querySelectorAll("main > section.page");
}

const TITLE = document.title;

// A percent-decoded URL part, or null when it is not valid percent-encoding (a mistyped or cut link).
function decoded(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

function route() {
  generation += 1;
  revokeBlobUrls();
  say("");
  for (const section of pages()) show(section, false);
  document.title = TITLE;  // no patient data in the title: browsers keep titles in their history
  const hash = location.hash || "#/";
  const study = /^#\/studies\/([^/?]+)$/.exec(hash);
  const uid = study ? decoded(study[1]) : null;
  if (uid && UID.test(uid)) {
    showStudy(uid).catch(report);
    return;
  }
  const offset = /[?&]offset=(\d+)/.exec(hash);
  showWorklist(offset ? Number(offset[1]) : 0).catch(report);
}

// ---- worklist -------------------------------------------------------------------------------------------

function patientCell(study) {
  const link = el("a", { href: "#/studies/" + encodeURIComponent(study.study_instance_uid) },
    study.dicom_patient_id || study.patient || "Unknown patient");
  const issuer = study.issuer_of_patient_id ? el("div", { class: "minor" }, study.issuer_of_patient_id) : null;
  return el("td", {}, link, issuer);
}

function findingsCell(study) {
  if (study.reports === null) return el("td", { class: "minor" }, "not shown to your role");
  if (study.reports.length === 0) {
    const states = [...new Set(study.jobs.map((job) => job.state))];
    return el("td", { class: "minor" }, states.length ? "analysis " + states.join(", ") : "not analyzed");
  }
  const positive = study.reports.flatMap((r) => r.positive_findings);
  if (!positive.length) return el("td", {}, "none positive");
  return el("td", {}, el("ul", { class: "inline" }, positive.map((display) => el("li", { class: "positive" }, display))));
}

async function showWorklist(offset) {
  const mine = generation;
  show($("worklist"), true);
  const rows = clear($("worklist-rows"));
  rows.append(el("tr", {}, el("td", { colspan: 6, class: "minor" }, "Loading…")));
  const body = await apiJson(`/v1/studies?limit=${PAGE_SIZE}&offset=${offset}`);
  if (mine !== generation) return;
  clear(rows);
  for (const study of body.studies) {
    rows.append(
      el("tr", {},
        patientCell(study),
        el("td", {}, study.study_date || "—"),
        el("td", {}, study.modalities.join(", ") || "—"),
        el("td", {}, study.accession_number || "—"),
        el("td", {}, study.status),
        findingsCell(study),
      ),
    );
  }
  if (!body.studies.length) {
    rows.append(el("tr", {}, el("td", { colspan: 6 }, offset ? "No more studies." : "No studies yet.")));
  }
  const previous = $("previous-page");
  const next = $("next-page");
  previous.disabled = offset === 0;
  next.disabled = body.studies.length < PAGE_SIZE;
  previous.onclick = () => { location.hash = "#/?offset=" + Math.max(0, offset - PAGE_SIZE); };
  next.onclick = () => { location.hash = "#/?offset=" + (offset + PAGE_SIZE); };
  const first = body.studies.length ? offset + 1 : offset;
  $("page-label").textContent = `Studies ${first}–${offset + body.studies.length}`;
}

// ---- study ----------------------------------------------------------------------------------------------

function fact(list, term, ...value) {
  list.append(el("dt", {}, term), el("dd", {}, ...(value.length ? value : ["—"])));
}

function patientName(patient) {
  const name = (patient.name || [])[0];
  if (!name) return null;
  return name.text || [...(name.given || []), name.family].filter(Boolean).join(" ") || null;
}

async function showStudy(uid) {
  const mine = generation;
  show($("study"), true);
  $("study-title").textContent = "Study";
  clear($("study-facts"));
  clear($("report"));
  show($("intended-use"), false);
  show($("analyze-box"), false);
  resetImages();

  const study = await apiJson(`/v1/studies/${encodeURIComponent(uid)}`);
  if (mine !== generation) return;
  $("study-title").textContent = "Study " + (study.accession_number || study.study_instance_uid);

  const facts = $("study-facts");
  const nameSlot = el("span", {}, study.patient ? "…" : "not linked to a FHIR Patient");
  fact(facts, "Patient", nameSlot);
  fact(facts, "Patient ID", study.dicom_patient_id || "—",
    study.issuer_of_patient_id ? el("span", { class: "minor" }, " (" + study.issuer_of_patient_id + ")") : null);
  fact(facts, "Study date", study.study_date || "—");
  fact(facts, "Modality", study.modalities.join(", ") || "—");
  fact(facts, "Description", study.description || "—");
  fact(facts, "Accession", study.accession_number || "—");
  fact(facts, "Status", study.status + (study.status_reason ? " — " + study.status_reason : ""));
  fact(facts, "Instances", String(study.instances));
  fact(facts, "Study Instance UID", el("code", {}, study.study_instance_uid));
  if (study.patient && PATIENT_REFERENCE.test(study.patient)) {
    apiJson("/fhir/" + study.patient)
      .then((patient) => {
        if (mine !== generation) return;
        const parts = [patientName(patient) || "(no name)", patient.gender, patient.birthDate && "born " + patient.birthDate];
        nameSlot.textContent = parts.filter(Boolean).join(", ");
      })
      .catch((error) => {
        nameSlot.textContent = error instanceof ApiError ? "not available: " + error.message : "not available";
      });
  }

  // the study says whether it has reports (null: this role may not read them); no request for one it lacks
  let body = null;
  if (study.reports === null) {
    say("Your role may not read AI reports.", "info");
  } else if (study.reports.length) {
    body = await apiJson(`/v1/studies/${encodeURIComponent(uid)}/report`);
  }
  if (mine !== generation) return;
  if (body && body.reports.length) {
    for (const one of body.reports) renderReport(one);
  } else if (study.reports !== null) {
    offerAnalysis(uid, study);
  }
  await loadImages(uid, body, mine);
}

function percent(value) {
  return (value * 100).toFixed(1) + " %";
}

function renderReport(one) {
  const model = one.model;
  const notice = $("intended-use");
  notice.replaceChildren(
    el("strong", {}, "AI-generated findings, not verified by a clinician. "),
    `Intended use of ${model.name} ${model.version}: `,
    el("span", { class: "intended" }, model.intended_use),
  );
  show(notice, true);

  const container = $("report");
  const meta = el("dl", { class: "facts" });
  fact(meta, "Model", `${model.name} ${model.version}`);
  fact(meta, "Execution provider", model.execution_provider);
  const amended = one.status === "amended" || one.version > 1;
  fact(meta, "Report status", `${one.status}, version ${one.version}`,
    amended ? el("strong", { class: "amended" }, " — amended") : null);
  fact(meta, "Issued", formatDateTime(one.updated_at));
  fact(meta, "Model sha256", el("code", {}, model.sha256.slice(0, 16) + "…"));

  const findings = el("table", { class: "grid findings" },
    el("caption", {}, `Findings of ${model.name}`),
    el("thead", {}, el("tr", {},
      el("th", { scope: "col" }, "Finding"),
      el("th", { scope: "col" }, "Probability"),
      el("th", { scope: "col" }, "Threshold"),
      el("th", { scope: "col" }, "Result"),
    )),
    el("tbody", {}, one.findings.map((f) => el("tr", { class: f.positive ? "positive" : "" },
      el("th", { scope: "row" }, f.display),
      el("td", { class: "number" }, percent(f.probability)),
      el("td", { class: "number" }, percent(f.threshold)),
      el("td", {}, f.positive ? "Positive" : "Negative"),
    ))),
  );

  const used = one.clinical_inputs.filter((v) => !v.missing);
  const missing = one.clinical_inputs.filter((v) => v.missing);
  const inputs = el("table", { class: "grid" },
    el("caption", {}, "Clinical inputs used"),
    el("thead", {}, el("tr", {},
      el("th", { scope: "col" }, "Input"),
      el("th", { scope: "col" }, "Value"),
      el("th", { scope: "col" }, "Unit"),
      el("th", { scope: "col" }, "Time"),
    )),
    el("tbody", {}, used.map((v) => el("tr", {},
      el("th", { scope: "row" }, v.feature, v.loinc ? el("span", { class: "minor" }, " LOINC " + v.loinc) : null),
      el("td", { class: "number" }, v.value === null ? "—" : String(Number(v.value.toFixed(3)))),
      el("td", {}, v.unit || "—"),
      el("td", {}, formatDateTime(v.effective_at)),
    ))),
  );
  const missingList = missing.length
    ? el("ul", {}, missing.map((v) => el("li", {}, v.feature, v.reason ? " — " + v.reason : "")))
    : el("p", {}, "None: every input the model takes was available.");

  const fhirPath = "/fhir/" + one.fhir;
  const fhirView = el("pre", { class: "json", hidden: true, tabindex: 0, "aria-label": "FHIR DiagnosticReport" });
  const fhirButton = el("button", { type: "button" }, "Show the FHIR DiagnosticReport");
  fhirButton.addEventListener("click", async () => {
    try {
      const resource = await apiJson(fhirPath);
      fhirView.textContent = JSON.stringify(resource, null, 2);
      show(fhirView, true);
    } catch (error) {
      report(error);
    }
  });
  const links = el("ul", { class: "links" },
    el("li", {}, fhirButton, " ", el("code", {}, fhirPath)),
  );
  const sr = one.dicom && one.dicom.sr;
  if (sr) {
    const srButton = el("button", { type: "button" }, "Download the DICOM SR");
    srButton.addEventListener("click", () => downloadInstance(sr.wado_rs, "clinfer-sr-" + sr.sop_instance_uid + ".dcm").catch(report));
    links.append(el("li", {}, srButton, " ", el("code", {}, sr.wado_rs)));
  } else {
    links.append(el("li", { class: "minor" }, "DICOM SR: " + ((one.dicom && one.dicom.state) || "not made")));
  }

  container.append(
    el("article", { class: "report", "aria-label": `Report of ${model.name}` },
      meta, findings, inputs, el("h3", {}, "Missing clinical inputs"), missingList,
      el("h3", {}, "Standard formats"), links, fhirView),
  );
}

function offerAnalysis(uid, study) {
  const active = study.jobs.filter((job) => ACTIVE.includes(job.state));
  const failed = study.jobs.filter((job) => job.state === "failed");
  const text = $("analyze-text");
  const button = $("analyze");
  if (active.length) {
    text.textContent = "Analysis in progress (" + active.map((j) => `${j.model}: ${j.state}`).join(", ") + ").";
    button.disabled = true;
    waitForReport(uid, generation);
  } else if (failed.length) {
    text.textContent = "The last analysis failed: " +
      failed.map((j) => `${j.model} at ${j.stage}: ${j.error ? j.error.message : "unknown error"}`).join("; ");
    button.disabled = false;
  } else {
    text.textContent = "This study has no AI report.";
    button.disabled = false;
  }
  button.onclick = async () => {
    button.disabled = true;
    try {
      const answer = await apiJson(`/v1/studies/${encodeURIComponent(uid)}/analyze`, { method: "POST" });
      if (!answer.jobs.length) {
        text.textContent = "No model applies to this study" + (answer.reason ? ": " + answer.reason : ".");
        return;
      }
      text.textContent = "Analysis requested (" + answer.jobs.map((j) => `${j.model}: ${j.state}`).join(", ") + ").";
      waitForReport(uid, generation);
    } catch (error) {
      button.disabled = false;
      report(error);
    }
  };
  show($("analyze-box"), true);
}

// Waits (long poll, up to 60 s at a time) for the analysis to finish, then shows the study again: with its
// report, or with why there is none (a failed job).
async function waitForReport(uid, mine) {
  try {
    for (let round = 0; round < 10 && mine === generation; round += 1) {
      try {
        await api(`/v1/studies/${encodeURIComponent(uid)}/report?wait=60`);
        break;
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 404)) throw error;
        const study = await apiJson(`/v1/studies/${encodeURIComponent(uid)}`);
        if (!study.jobs.some((job) => ACTIVE.includes(job.state))) break;
      }
    }
    if (mine === generation) route();
  } catch (error) {
    report(error);
  }
}

// ---- images ---------------------------------------------------------------------------------------------

function resetImages() {
  for (const id of ["study-image", "heatmap-image"]) {
    const image = $(id);
    image.removeAttribute("src");
    image.alt = "";
    show(image, false);
  }
  const toggle = $("heatmap-toggle");
  toggle.checked = false;
  toggle.disabled = true;
  toggle.onchange = null;
  $("image-status").textContent = "";
}

function tagValue(item, tag) {
  const element = item[tag];
  return element && element.Value ? element.Value[0] : null;
}

async function qido(path) {
  const response = await api(path, { headers: { Accept: "application/dicom+json" } });
  return response.status === 204 ? [] : response.json();
}

// The image the report read, else the first image of the study: its WADO-RS path and its number of frames.
async function sourceInstance(uid, wanted) {
  for (const series of await qido(`/dicomweb/studies/${encodeURIComponent(uid)}/series`)) {
    if (["SR", "KO", "PR"].includes(tagValue(series, "00080060"))) continue;
    const seriesUid = tagValue(series, "0020000E");
    const instances = await qido(`/dicomweb/studies/${encodeURIComponent(uid)}/series/${encodeURIComponent(seriesUid)}/instances`);
    for (const instance of instances) {
      const sop = tagValue(instance, "00080018");
      if (wanted ? sop === wanted : tagValue(instance, "00280010")) {
        return {
          path: `/dicomweb/studies/${encodeURIComponent(uid)}/series/${encodeURIComponent(seriesUid)}/instances/${encodeURIComponent(sop)}`,
          frames: Number(tagValue(instance, "00280008")) || 1,
        };
      }
    }
  }
  return null;
}

async function showRendered(image, path, alt) {
  const response = await api(path + "/rendered?viewport=" + VIEWPORT, { headers: { Accept: "image/png" } });
  image.src = blobUrl(await response.blob());
  image.alt = alt;
  await image.decode();
}

async function loadImages(uid, body, mine) {
  const status = $("image-status");
  status.textContent = "Loading the image…";
  const latest = body && body.reports.length ? body.reports[body.reports.length - 1] : null;
  try {
    const source = await sourceInstance(uid, latest ? latest.source_sop_instance_uid : null);
    if (mine !== generation) return;
    if (!source) {
      status.textContent = "This study has no image to show.";
      return;
    }
    const image = $("study-image");
    // the models read the middle frame of a multi-frame image (NumberOfFrames // 2, from 0); others the first
    const frame = latest && source.frames > 1 ? Math.floor(source.frames / 2) + 1 : 1;
    const path = frame > 1 ? source.path + "/frames/" + frame : source.path;
    await showRendered(image, path, "The study's image, as rendered by the service");
    if (mine !== generation) return;
    show(image, true);
    const which = source.frames > 1 ? " (frame " + frame + " of " + source.frames + ")" : "";
    status.textContent = (latest ? "The image the model read" : "The study's first image") + which + ".";
    const heatmap = latest && latest.dicom && latest.dicom.heatmap;
    const toggle = $("heatmap-toggle");
    if (!heatmap) {
      status.textContent += latest ? " No heatmap: " + ((latest.dicom && latest.dicom.state) || "not made") + "." : "";
      return;
    }
    const overlay = $("heatmap-image");
    await showRendered(overlay, heatmap.wado_rs, "AI heatmap blended over the image (where the model looked)");
    if (mine !== generation) return;
    toggle.disabled = false;
    toggle.onchange = () => show(overlay, toggle.checked);
  } catch (error) {
    if (mine !== generation) return;
    status.textContent = "The image could not be shown" + (error instanceof ApiError ? ": " + error.message : ".");
    report(error);
  }
}

// ---- downloads ------------------------------------------------------------------------------------------

function indexOf(haystack, needle, from) {
  outer: for (let i = from; i <= haystack.length - needle.length; i += 1) {
    for (let j = 0; j < needle.length; j += 1) {
      if (haystack[i + j] !== needle[j]) continue outer;
    }
    return i;
  }
  return -1;
}

// WADO-RS answers multipart/related: the instance is its first (and only) part.
async function downloadInstance(path, filename) {
  const response = await api(path, { headers: { Accept: 'multipart/related; type="application/dicom"' } });
  const boundary = /boundary="?([^";]+)"?/i.exec(response.headers.get("content-type") || "");
  const bytes = new Uint8Array(await response.arrayBuffer());
  const encoder = new TextEncoder();
  const start = boundary ? indexOf(bytes, encoder.encode("\r\n\r\n"), 0) : -1;
  const end = start >= 0 ? indexOf(bytes, encoder.encode("\r\n--" + boundary[1]), start + 4) : -1;
  if (start < 0 || end < 0) throw new Error("the service's answer was not a multipart/related body");
  const link = el("a", {
    href: blobUrl(new Blob([bytes.slice(start + 4, end)], { type: "application/dicom" })),
    download: filename,
  });
  document.body.append(link);
  link.click();
  link.remove();
}

window.addEventListener("hashchange", route);
boot(route);
