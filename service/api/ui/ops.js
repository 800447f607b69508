// The operations page: models (version, execution provider, loaded), jobs by state, recent failures, result pushes
// that failed or are being retried (and sending the failed ones again).

import { apiJson, boot, clear, el, formatDateTime, report, say, show } from "./common.js";

const STATES = ["queued", "preprocessing", "inferring", "succeeded", "failed"];
const $ = (id) => document.getElementById(id);

function renderModels(body) {
  const rows = clear($("model-rows"));
  for (const model of body.models) {
    for (const version of model.versions) {
      rows.append(el("tr", {},
        el("th", { scope: "row" }, model.name),
        el("td", {}, version.version),
        el("td", {}, version.execution_provider || "—"),
        el("td", {}, version.loaded ? "yes" : "no"),
        el("td", {}, model.intended_use),
      ));
    }
  }
  if (!body.models.length) rows.append(el("tr", {}, el("td", { colspan: 5 }, "No model is served.")));
  const errors = clear($("model-errors"));
  for (const [name, message] of Object.entries(body.errors || {})) {
    errors.append(el("li", {}, el("strong", {}, name + ": "), message));
  }
}

function renderStates(counts) {
  const rows = clear($("state-rows"));
  const names = [...STATES, ...Object.keys(counts).filter((s) => !STATES.includes(s))];
  for (const state of names) {
    rows.append(el("tr", {}, el("th", { scope: "row" }, state), el("td", { class: "number" }, String(counts[state] || 0))));
  }
}

function renderFailed(jobs) {
  const rows = clear($("failed-rows"));
  for (const job of jobs) {
    rows.append(el("tr", {},
      el("th", { scope: "row" }, el("code", {}, job.id)),
      el("td", {}, job.study_instance_uid
        ? el("a", { href: "/ui/#/studies/" + encodeURIComponent(job.study_instance_uid) }, job.study_instance_uid)
        : "—"),
      el("td", {}, `${job.model} ${job.version}`),
      el("td", {}, job.stage || "—"),
      el("td", {}, job.error ? el("code", {}, job.error.code) : "—", job.error ? " " + job.error.message : ""),
      el("td", { class: "number" }, String(job.attempts)),
      el("td", {}, formatDateTime(job.updated_at)),
    ));
  }
  if (!jobs.length) rows.append(el("tr", {}, el("td", { colspan: 7 }, "No failed jobs.")));
}

function renderPushes(failed, pending) {
  const rows = clear($("push-rows"));
  const troubled = [...failed, ...pending.filter((push) => push.last_error)];
  for (const push of troubled) {
    rows.append(el("tr", {},
      el("th", { scope: "row" }, push.destination),
      el("td", {}, push.state),
      el("td", {}, el("a", { href: "/ui/#/studies/" + encodeURIComponent(push.study_instance_uid) },
        push.study_instance_uid)),
      el("td", { class: "number" }, String(push.report_version) + (push.current ? "" : " (amended since)")),
      el("td", { class: "number" }, String(push.attempts)),
      el("td", {}, push.last_error || "—"),
      el("td", {}, formatDateTime(push.next_attempt_at)),
      el("td", {}, formatDateTime(push.updated_at)),
    ));
  }
  if (!troubled.length) rows.append(el("tr", {}, el("td", { colspan: 8 }, "No failed or retried pushes.")));
  show($("retry-pushes"), failed.some((push) => push.current));
}

async function retryPushes() {
  const button = $("retry-pushes");
  button.disabled = true;
  try {
    const answer = await apiJson("/v1/deliveries/retry", { method: "POST" });
    $("retry-result").textContent = answer.retried === 1 ? "1 push sent again." : `${answer.retried} pushes sent again.`;
    await load();
  } catch (error) {
    report(error);
  } finally {
    button.disabled = false;
  }
}

async function load() {
  say("");
  show($("ops"), true);
  try {
    const [models, all, failed, failedPushes, pendingPushes] = await Promise.all([
      apiJson("/v1/models"),
      apiJson("/v1/jobs?limit=1"),
      apiJson("/v1/jobs?state=failed&limit=20"),
      apiJson("/v1/deliveries?state=failed&limit=50"),
      apiJson("/v1/deliveries?state=pending&limit=50"),
    ]);
    renderModels(models);
    renderStates(all.counts || {});
    renderFailed(failed.jobs);
    renderPushes(failedPushes.deliveries, pendingPushes.deliveries);
    $("refreshed").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (error) {
    report(error);
  }
}

$("refresh").addEventListener("click", load);
$("retry-pushes").addEventListener("click", retryPushes);
boot(load);
