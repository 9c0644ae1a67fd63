// The slide viewer: a slide's Deep Zoom tiles in OpenSeadragon (vendored, static/openseadragon),
// the model's P(IDC) and the tissue mask as two more tiled layers in the same geometry, the IDC
// regions (GeoJSON, level-0 pixels) outlined on a canvas, a scale bar, and a click to inspect.
// Uses app.js's helpers ($, el, fixed, percent, callCounts, CALLS, facts, showWarnings,
// showError, bindUpload). Every text from the server goes in through textContent.
"use strict";

const TILE = 254; // as the server cuts them (idcscope.serve.viewer.TILE_SIZE, OVERLAP)
const OVERLAP = 1;
const POLL_MS = 1000;

// What is open: exposed for the browser tests (window.idcViewer).
const state = {
  osd: null, view: null, slide: null, layers: {}, adding: {}, regions: [], poll: null, threshold: 0,
};
window.idcViewer = state;

function overlaySource(view, layer) {
  const t = layer === "prob" ? state.threshold : 0;
  return {
    width: view.width, height: view.height, tileSize: TILE, tileOverlap: OVERLAP,
    getTileUrl: (level, x, y) => `${view.overlay}/${level}/${x}_${y}.png?layer=${layer}&threshold=${t}&v=${view.version}`,
  };
}

function layerOpacity(layer) {
  if (layer === "tissue") return $("#show-tissue").checked ? 1 : 0;
  return $("#show-overlay").checked ? Number($("#overlay-opacity").value) : 0;
}

// (Re)places one overlay layer: its tiles' URLs carry the view's version and the threshold.
// One add at a time per layer: a change while one is on its way places the layer again after.
function placeLayer(layer) {
  if (state.adding[layer]) {
    state.adding[layer] = "again";
    return;
  }
  state.adding[layer] = true;
  const old = state.layers[layer];
  state.osd.addTiledImage({
    tileSource: overlaySource(state.view, layer),
    ...(old ? { index: state.osd.world.getIndexOfItem(old), replace: true } : {}),
    opacity: layerOpacity(layer),
    success: (e) => {
      state.layers[layer] = e.item;
      const again = state.adding[layer] === "again";
      state.adding[layer] = false;
      if (again) placeLayer(layer);
    },
    error: () => { state.adding[layer] = false; },
  });
}

function setOpacities() {
  for (const [layer, item] of Object.entries(state.layers)) item.setOpacity(layerOpacity(layer));
}

// ------------------------------------------------------------------------- outlines, scale bar

function drawOutlines() {
  const canvas = $("#osd canvas.outlines");
  const box = $("#osd");
  canvas.width = box.clientWidth;
  canvas.height = box.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.slide || !$("#show-outlines").checked) return;
  ctx.strokeStyle = "#00e5ff";
  ctx.lineWidth = 2;
  for (const rings of state.regions) {
    ctx.beginPath();
    for (const ring of rings) {
      ring.forEach(([x, y], i) => {
        const p = state.slide.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        if (i) ctx.lineTo(p.x, p.y); else ctx.moveTo(p.x, p.y);
      });
      ctx.closePath();
    }
    ctx.stroke();
  }
}

// The longest round length (1, 2, 5 x 10^k µm) that fits in 160 screen pixels at this zoom.
function drawScaleBar() {
  const bar = $("#osd .scalebar");
  const mpp = state.view && state.view.mpp;
  bar.hidden = !mpp || !state.slide;
  if (bar.hidden) return;
  const zoom = state.slide.viewportToImageZoom(state.osd.viewport.getZoom(true)); // screen px per image px
  const umPerPx = mpp / zoom;
  let length = 1;
  for (const um of [1, 2, 5].flatMap((m) => [0, 1, 2, 3, 4, 5].map((k) => m * 10 ** k)).sort((a, b) => a - b)) {
    if (um / umPerPx <= 160) length = um;
  }
  $(".line", bar).style.width = `${Math.round(length / umPerPx)}px`;
  $("span", bar).textContent = length >= 1000 ? `${length / 1000} mm` : `${length} µm`;
  bar.dataset.um = String(length);
}

function redraw() {
  drawOutlines();
  drawScaleBar();
}

// ------------------------------------------------------------------------- the view

function measurementPairs(view) {
  const m = view.measurements;
  if (!m) return [["Slide", view.name], ["Status", view.status]];
  return [
    ["Slide", view.name],
    ["Tissue", `${m.tissue_mm2} mm²`],
    ["IDC", `${m.idc_mm2} mm²`],
    ["IDC share of tissue", percent(m.idc_share)],
    ["Tiles", `${m.n_tiles} (${m.n_idc_tiles} at or above ${fixed(m.threshold)})`],
    ["Calls", m.calls ? callCounts(m.calls) : undefined],
    ["µm per pixel", view.mpp],
  ];
}

function showStatus(view) {
  const said = {
    queued: "waiting for the model…", reading: "reading the slide at the model's resolution…",
    scoring: `scoring: ${view.scored_tiles} of its ${view.tissue_tiles} tissue tiles drawn, band by band…`,
    done: `scored in ${fixed(view.seconds, 1)} s`, error: "",
  };
  const box = $("#viewer-results");
  $(".viewer-status", box).textContent = view.status === "error" ? `failed: ${view.error}` : said[view.status];
  box.dataset.status = view.status;
  facts($("dl.measurements", box), measurementPairs(view));
  showWarnings(box, view.warnings);
  const links = $(".links", box);
  links.hidden = !view.files.geojson;
  if (view.files.geojson) {
    $(".geojson", links).href = view.files.geojson;
    $(".tiles", links).href = view.files.tiles_csv;
  }
}

async function loadRegions(url) {
  const geojson = await (await fetch(url)).json();
  state.regions = geojson.features.map((f) => (f.geometry.type === "Polygon"
    ? [f.geometry.coordinates] : f.geometry.coordinates)).flat(1);
  redraw();
}

async function poll() {
  const response = await fetch(`/api/views/${state.view.id}`);
  if (!response.ok) return;
  const view = await response.json();
  const changed = view.version !== state.view.version;
  state.view = view;
  showStatus(view);
  if (changed) ["tissue", "prob"].forEach(placeLayer);
  if (view.status === "done" || view.status === "error") {
    clearInterval(state.poll);
    if (view.files.geojson) loadRegions(view.files.geojson);
  }
}

function markThreshold(threshold) {
  $(".colorbar .mark").style.left = `${200 * threshold - 1}px`;
}

function openView(view) {
  clearInterval(state.poll);
  if (state.osd) state.osd.destroy();
  Object.assign(state, { view, slide: null, layers: {}, adding: {}, regions: [] });
  $("#inspect").hidden = true;
  $("#viewer-results").hidden = false;
  state.osd = OpenSeadragon({
    element: $("#osd"), prefixUrl: "/static/openseadragon/images/", drawer: "canvas",
    tileSources: view.dzi, showNavigator: false, showRotationControl: false,
    gestureSettingsMouse: { clickToZoom: false }, maxZoomPixelRatio: 4,
  });
  state.osd.world.addOnceHandler("add-item", (e) => {
    state.slide = e.item;
    ["tissue", "prob"].forEach(placeLayer);
  });
  state.osd.addHandler("update-viewport", redraw);
  state.osd.addHandler("canvas-click", (e) => {
    if (!e.quick || !state.slide) return;
    const p = state.slide.viewerElementToImageCoordinates(e.position);
    inspect(p.x, p.y);
  });
  showStatus(view);
  fetch("/api/health").then((r) => r.json()).then((h) => markThreshold(h.model.threshold));
  state.poll = setInterval(poll, POLL_MS);
}

// ------------------------------------------------------------------------- inspect

const MAP_NAMES = {
  patch: "the patch", cam: "CAM", saliency: "saliency",
  block: "what the model saw", neighbourhood: "neighbourhood evidence", patch_planes: "patch evidence",
};

function renderInspect(tile) {
  const box = $("#inspect");
  $(".where", box).textContent = `row ${tile.row}, column ${tile.col} (x ${tile.x}, y ${tile.y})`;
  $(".maps", box).replaceChildren(...Object.entries(tile.images).map(([kind, src]) => el("figure", {},
    el("img", { src, alt: `${MAP_NAMES[kind]} of the tile`, width: 84, height: 84 }),
    el("figcaption", {}, MAP_NAMES[kind]))));
  const context = tile.neighbours === null ? "alone" : `${tile.neighbours} of 8 neighbours`;
  facts($("dl.said", box), [
    ["P(IDC)", tile.prob_idc.toFixed(6)],
    ["Call", CALLS[tile.call]],
    ["Input check", tile.input_check],
    ["Context", `${context}${tile.context ? `: AUC ${fixed(tile.context_auc)}` : ""}`],
    ["Tissue", percent(tile.tissue)],
  ]);
  $("dl.said dd", box).dataset.prob = String(tile.prob_idc);
  $(".around tbody", box).replaceChildren(...tile.around.map((line, r) => el("tr", {},
    ...line.map((p, c) => el("td", { className: r === 1 && c === 1 ? "centre" : "" }, p === null ? "–" : fixed(p))))));
  box.hidden = false;
}

async function inspect(x, y) {
  const panel = $("#panel-viewer");
  $(".error", panel).hidden = true;
  const response = await fetch(`/api/views/${state.view.id}/inspect?x=${x}&y=${y}`);
  const body = await response.json();
  if (response.ok) renderInspect(body);
  else if (response.status === 404 || response.status === 409) {
    $("#inspect").hidden = false;
    $("#inspect .where").textContent = body.error;
    $("#inspect .maps").replaceChildren();
    $("#inspect dl.said").replaceChildren();
    $("#inspect .around tbody").replaceChildren();
  } else showError(panel, body.error || `the server answered ${response.status}`);
}

// ------------------------------------------------------------------------- library, controls

async function loadLibrary() {
  const library = await (await fetch("/api/slides")).json();
  const box = $("#panel-viewer .library");
  box.hidden = !library.folder;
  $("#library-slide").replaceChildren(...library.slides.map((s) => el("option", { value: s.name }, s.name)));
  $("#library-open").disabled = !library.slides.length;
}

async function openLibrarySlide() {
  const panel = $("#panel-viewer");
  $(".error", panel).hidden = true;
  const params = new URLSearchParams({ slide: $("#library-slide").value });
  if ($("#viewer-mpp").value) params.set("mpp", $("#viewer-mpp").value);
  const response = await fetch(`/api/views?${params}`, { method: "POST" });
  const body = await response.json();
  if (response.ok) openView(body);
  else showError(panel, body.error || `the server answered ${response.status}`);
}

// The slide tab's µm-per-pixel option, copied into the viewer's as #viewer-mpp.
function addMppOption() {
  const options = $("#panel-slide .slide-options").cloneNode(true);
  $("label", options).htmlFor = "viewer-mpp";
  $("input", options).id = "viewer-mpp";
  $("#panel-viewer .viewer-open .library").after(options);
}

document.addEventListener("DOMContentLoaded", () => {
  addMppOption();
  bindUpload("viewer-slide-input", () => {
    const mpp = $("#viewer-mpp").value;
    return mpp ? `/api/views/slide?mpp=${encodeURIComponent(mpp)}` : "/api/views/slide";
  }, openView);
  bindUpload("viewer-patient-input", "/api/views/patient", openView);
  $("#library-open").addEventListener("click", openLibrarySlide);
  for (const id of ["#show-overlay", "#overlay-opacity", "#show-tissue"]) {
    $(id).addEventListener("input", setOpacities);
  }
  $("#show-outlines").addEventListener("input", redraw);
  let pending = null;
  $("#overlay-threshold").addEventListener("input", (e) => {
    state.threshold = Number(e.target.value);
    $("#threshold-value").textContent = fixed(state.threshold, 2);
    clearTimeout(pending);
    pending = setTimeout(() => state.osd && state.layers.prob && placeLayer("prob"), 150);
  });
  window.addEventListener("resize", redraw);
  loadLibrary();
});
