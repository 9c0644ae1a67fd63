// The idcscope page: upload, show what the server found, offer the downloads.
// Plain DOM, no framework; every text from the server goes in through textContent.
"use strict";

const MB = 1024 * 1024;
let limits = null;

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const percent = (x) => (x === null || x === undefined ? "n/a" : `${(100 * x).toFixed(1)}%`);
const fixed = (x, digits = 3) => (x === null || x === undefined ? "n/a" : x.toFixed(digits));
const said = (pred) => (pred ? "IDC" : "no IDC");
const CALLS = { idc: "IDC", no_idc: "no IDC", uncertain: "uncertain" };

// "3 IDC · 5 no IDC · 2 uncertain"
const callCounts = (calls) => Object.entries(CALLS).map(([k, word]) => `${calls[k] || 0} ${word}`).join(" · ");

// The input check's counts other than "ok": "2 stain, 1 glass", or "all ok".
function flagged(checks = {}) {
  const bad = Object.entries(checks).filter(([reason]) => reason !== "ok");
  return bad.length ? bad.map(([reason, n]) => `${n} ${reason}`).join(", ") : "all ok";
}

// ---------------------------------------------------------------------------- model and tabs

async function loadHealth() {
  const box = $("#model");
  try {
    const response = await fetch("/api/health");
    const health = await response.json();
    limits = health.limits;
    const m = health.model;
    box.replaceChildren(
      el("span", { className: "pill" + (health.busy ? " busy" : "") }, health.busy ? "busy" : "ready"),
      ` ${m.model} · ${m.checkpoint} · threshold ${fixed(m.threshold)}` +
        (m.contexts.length ? ` · ${m.contexts.length} scoring contexts` : "") +
        (m.context_sigma ? ` · context σ ${fixed(m.context_sigma, 2)}` : ""),
    );
    renderContexts(m.contexts);
    const noSlides = !health.slides;
    $(".slide-unavailable").hidden = !noSlides;
    $("#slide-input").disabled = noSlides;
    $("#slide-mpp").disabled = noSlides;
  } catch (error) {
    box.textContent = "the server does not answer";
  }
}

// The model's scoring contexts: where it decides a patch, and how well it did there.
function renderContexts(contexts) {
  const box = $("#model-contexts");
  $(".none", box).hidden = contexts.length > 0;
  $("table", box).hidden = contexts.length === 0;
  const band = ([below, from]) => (below === null || from === null ? "n/a"
    : below === from ? `none: IDC from ${fixed(from)}` : `${fixed(below)} to ${fixed(from)}`);
  $("tbody", box).replaceChildren(...contexts.map((c) => el("tr", { dataset: { context: c.name } },
    el("td", {}, c.name),
    el("td", {}, c.neighbours[0] === c.neighbours[1] ? `${c.neighbours[0]}` : `${c.neighbours[0]}–${c.neighbours[1]}`),
    el("td", {}, band(c.band)),
    el("td", { className: "auc" }, fixed(c.auc)),
    el("td", { className: "coverage" }, percent(c.coverage)),
  )));
}

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const chosen = other === tab;
    other.setAttribute("aria-selected", String(chosen));
    $("#" + other.getAttribute("aria-controls")).hidden = !chosen;
  }
}

// ---------------------------------------------------------------------------- uploads

function showWarnings(box, warnings = []) {
  const list = $(".warnings", box);
  list.replaceChildren(...warnings.map((w) => el("p", {}, w)));
  list.hidden = !warnings.length;
}

function showError(panel, message, files = []) {
  const box = $(".error", panel);
  const list = files.length
    ? el("ul", {}, ...files.map((f) => el("li", {}, el("code", {}, f.file), `: ${f.error}`)))
    : null;
  box.replaceChildren(...[el("p", {}, message), list].filter(Boolean));
  box.hidden = false;
}

function tooLarge(files) {
  const total = files.reduce((sum, f) => sum + f.size, 0);
  return limits && total > limits.max_upload_mb * MB
    ? `${(total / MB).toFixed(1)} MB is more than this server accepts (${limits.max_upload_mb} MB)`
    : "";
}

// Resolves with the JSON result; rejects with {message, files} for the error box.
function upload(url, files, panel) {
  const progress = $(".progress", panel);
  const bar = $(".bar", progress);
  const what = $(".what", progress);
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  progress.hidden = false;
  bar.style.width = "0%";
  what.textContent = "uploading…";
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      bar.style.width = `${(100 * e.loaded) / e.total}%`;
      if (e.loaded === e.total) what.textContent = "analysing…";
    };
    xhr.onload = () => {
      progress.hidden = true;
      const body = xhr.response || {};
      if (xhr.status === 200) resolve(body);
      else reject({ message: body.error || `the server answered ${xhr.status}`, files: body.files || [] });
    };
    xhr.onerror = () => {
      progress.hidden = true;
      reject({ message: "the upload failed (connection closed: too large, or the server stopped)" });
    };
    xhr.send(form);
  });
}

async function submit(panel, url, files, render) {
  if (!files.length) return;
  $(".error", panel).hidden = true;
  const problem = tooLarge(files);
  if (problem) return showError(panel, problem);
  const poll = setInterval(loadHealth, 2000);
  try {
    render(await upload(url, files, panel));
  } catch (error) {
    showError(panel, error.message, error.files);
  } finally {
    clearInterval(poll);
    loadHealth();
  }
}

function bindUpload(inputId, url, render) {
  const input = $("#" + inputId);
  const panel = input.closest("section");
  const drop = input.closest(".drop");
  const go = (files) => submit(panel, typeof url === "function" ? url() : url, [...files], render);
  input.addEventListener("change", () => {
    go(input.files);
    input.value = ""; // choosing the same files again uploads them again
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (!input.disabled) go(input.multiple ? e.dataTransfer.files : [...e.dataTransfer.files].slice(0, 1));
  });
}

// ---------------------------------------------------------------------------- results

function thumb(src, alt, title = "", side = 100, caption = null) {
  const img = el("img", { src, alt, title, width: side, height: side });
  return el("td", { className: "img" }, img, caption === null ? null : el("small", {}, caption));
}

// Patch, CAM and saliency; or, for a model that sees the neighbourhood, the 3x3 block it
// saw and the evidence (logits) of its neighbourhood planes and of its patch planes.
const MAPS = {
  cam: (result) => ["Patch", result.cam, "Saliency"],
  block: () => ["What the model saw", "Neighbourhood evidence", "Patch evidence"],
};

function mapCells(row, kind) {
  const f = row.file;
  if (kind === "cam") {
    return [
      thumb(row.images.patch, `patch ${f}`),
      thumb(row.images.cam, `CAM of ${f}`, row.cam_empty ? "no positive evidence: bare patch" : ""),
      thumb(row.images.saliency, `saliency of ${f}`),
    ];
  }
  const logit = (x) => `${x >= 0 ? "+" : ""}${x.toFixed(2)} logit`;
  return [
    thumb(row.images.block, `the 3x3 block the model saw around ${f}`, "the patch is outlined", 150),
    thumb(row.images.neighbourhood, `neighbourhood evidence for IDC in ${f}`,
      "positive part of the neighbourhood planes' attribution", 150, logit(row.evidence.neighbourhood)),
    thumb(row.images.patch_planes, `patch evidence for IDC in ${f}`,
      "positive part of the patch planes' attribution", 150, logit(row.evidence.patch)),
  ];
}

function callCell(row) {
  const td = el("td", { className: `call ${row.call}` }, el("span", { className: "word" }, CALLS[row.call]));
  if (row.call === "uncertain") td.title = `leans ${said(row.pred)} (P(IDC) against the threshold)`;
  if (row.input_check !== "ok") td.append(el("small", { className: "check" }, `input check: ${row.input_check}`));
  return td;
}

function contextCell(row) {
  const where = row.neighbours === null ? "alone" : `${row.neighbours} of 8 neighbours`;
  const measured = row.context === null ? "AUC n/a" : `${row.context}: AUC ${fixed(row.context_auc)}`;
  return el("td", { className: "context" }, el("span", {}, where), el("small", { className: "auc" }, measured));
}

function patchRow(row, kind) {
  const tr = el("tr", { dataset: { file: row.file } });
  if (row.error) {
    tr.className = "failed";
    tr.append(el("td", { colSpan: 3 }, "not predicted"), el("td", { className: "file" }, row.file),
      el("td", { colSpan: 4, className: "reason" }, row.error));
    return tr;
  }
  const bar = el("span", { className: "bar" });
  bar.style.width = `${100 * row.prob_idc}%`;
  const known = row.label !== null;
  if (known) {
    const agrees = row.label === (row.call === "idc" ? 1 : 0);
    tr.className = row.call === "uncertain" ? "undecided" : agrees ? "agrees" : "disagrees";
  }
  tr.append(
    ...mapCells(row, kind),
    el("td", { className: "file" }, row.file),
    el("td", { className: "prob", dataset: { prob: row.prob_idc } },
      el("span", { className: "value" }, fixed(row.prob_idc)), el("span", { className: "meter" }, bar)),
    callCell(row),
    contextCell(row),
    el("td", { className: "label" }, known ? said(row.label) : "unknown"),
  );
  return tr;
}

function renderPatches(result) {
  const box = $("#patch-results");
  const failed = result.n_files - result.n_predicted;
  $(".counts", box).replaceChildren(
    `${result.n_predicted} of ${result.n_files} files predicted: `,
    ...Object.entries(CALLS).flatMap(([k, word], i) => [
      i ? " · " : "", el("span", { className: `count ${k}` }, `${result.calls[k]} ${word}`),
    ]),
    ` (threshold ${fixed(result.threshold)})` + (failed ? `; ${failed} could not be used` : ""),
  );
  const names = MAPS[result.explanation](result);
  box.querySelectorAll("th.map").forEach((th, i) => { th.textContent = names[i]; });
  showWarnings(box, result.warnings);
  $(".csv", box).href = result.files.csv;
  $("tbody", box).replaceChildren(...result.rows.map((row) => patchRow(row, result.explanation)));
  box.hidden = false;
}

// Fills the box's dl.facts (or the dl given) with [term, value] pairs; undefined values are left out.
function facts(box, pairs) {
  (box.matches("dl") ? box : $(".facts", box)).replaceChildren(
    ...pairs.filter(([, v]) => v !== undefined).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]),
  );
}

function renderPatient(result) {
  const box = $("#patient-results");
  const s = result.summary;
  const known = "idc_fraction_true" in s;
  facts(box, [
    ["Patient", s.patient],
    ["Patches", s.n_patches + (s.n_unreadable ? ` (${s.n_unreadable} unreadable)` : "")],
    ["Threshold", fixed(s.threshold)],
    ["Spatial context", s.context_sigma ? `σ ${fixed(s.context_sigma, 2)} patches` : "off"],
    ["Calls", callCounts(s.calls)],
    ["Input check", flagged(s.input_check)],
    ["Predicted IDC area", percent(s.idc_fraction_pred)],
    ["Annotated IDC area", known ? percent(s.idc_fraction_true) : undefined],
    ["Dice", known ? fixed(s.dice) : undefined],
    ["IoU", known ? fixed(s.iou) : undefined],
    ["Patch AUC", known ? fixed(s.auc) : undefined],
    ["Sensitivity", known ? fixed(s.sensitivity) : undefined],
    ["Specificity", known ? fixed(s.specificity) : undefined],
  ]);
  showWarnings(box, result.warnings);
  $("#patient-heatmap").src = result.files.heatmap;
  $("#patient-probability").src = result.files.probability;
  $(".csv", box).href = result.files.csv;
  $(".json", box).href = result.files.json;
  const skipped = $(".skipped", box);
  skipped.hidden = !result.skipped.length;
  $("summary", skipped).textContent = `${result.skipped.length} files left out`;
  $("ul", skipped).replaceChildren(
    ...result.skipped.map((f) => el("li", {}, el("code", {}, f.file), `: ${f.error}`)),
  );
  box.hidden = false;
}

function renderSlide(result) {
  const box = $("#slide-results");
  const s = result.summary;
  facts(box, [
    ["Slide", s.slide],
    ["Tissue tiles", s.n_tiles],
    ["IDC tiles", s.n_idc_tiles],
    ["Calls", s.calls ? callCounts(s.calls) : undefined],
    ["Input check", s.input_check ? flagged(s.input_check) : undefined],
    ["IDC fraction", percent(s.idc_fraction)],
    ["Tissue", s.tissue_mm2 === undefined ? undefined : `${s.tissue_mm2} mm²`],
    ["IDC", s.idc_mm2 === undefined ? undefined : `${s.idc_mm2} mm²`],
    ["Slide µm/px", s.slide_mpp],
    ["Speed", s.tiles_per_s ? `${s.tiles_per_s} tiles/s` : undefined],
  ]);
  showWarnings(box, result.warnings);
  $("#slide-overlay").src = result.files.overlay || "";
  const links = [[".geojson", result.files.geojson], [".tiles", result.files.tiles_csv]];
  for (const [selector, href] of links) {
    $(selector, box).hidden = !href;
    if (href) $(selector, box).href = href;
  }
  box.hidden = false;
}

// ---------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
  }
  bindUpload("patch-input", "/api/patches", renderPatches);
  bindUpload("patient-input", "/api/patient", renderPatient);
  bindUpload("slide-input", () => {
    const mpp = $("#slide-mpp").value;
    return mpp ? `/api/slide?mpp=${encodeURIComponent(mpp)}` : "/api/slide";
  }, renderSlide);
  loadHealth();
});
