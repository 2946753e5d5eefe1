// convlens explorer: plain JavaScript, no library, nothing from the network.
// Every label and file name goes into the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const S = { images: [], labels: [], titles: {}, image: null, cls: null, top1: null, method: "gradcam", layer: "",
  scale: "norm", channel: null, camJob: null, featureJob: null, occJob: null, seq: { cam: 0, ch: 0, feat: 0, pred: 0, occ: 0 } };

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") e.textContent = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("aria") || k === "role" || k === "type" || k === "title") e.setAttribute(k.replace(/^aria([A-Z])/, (m, c) => "aria-" + c.toLowerCase()), v);
    else e[k] = v;
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function pending(delta) {
  document.body.dataset.pending = String(Number(document.body.dataset.pending) + delta);
}

function showError(msg) {
  $("error-text").textContent = msg;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; }

async function api(path, opts = {}) {
  pending(1);
  try {
    const r = await fetch(path, opts);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok && r.status !== 202) {
      const err = new Error((body && body.error) || `${r.status} ${r.statusText}`);
      err.status = r.status;
      throw err;
    }
    return { status: r.status, body };
  } finally {
    pending(-1);
  }
}

const post = (path, data) => api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data) });

// poll a job until it ends; onProgress(done, total). When stale() turns true (the user moved on)
// the polling stops and null is returned: the job goes on in the background and its result is
// cached for when the user comes back (Cancel stops it).
async function waitJob(job, onProgress, stale = () => false) {
  pending(1);
  try {
    while (job.state === "queued" || job.state === "running") {
      if (stale()) return null;
      onProgress(job.done, job.total);
      await new Promise((r) => setTimeout(r, 250));
      job = (await api(`/api/jobs/${encodeURIComponent(job.id)}`)).body;
    }
    onProgress(job.done, job.total);
    return job;
  } finally {
    pending(-1);
  }
}

function setBar(bar, done, total) {
  if (total > 0) { bar.max = total; bar.value = done; } else { bar.removeAttribute("value"); }
}

// ---- images ------------------------------------------------------------------------------
function renderStrip() {
  const ul = $("strip");
  ul.replaceChildren();
  for (const im of S.images) {
    const b = el("button", { type: "button", title: im.error ? `${im.name}: ${im.error}` : im.name,
      ariaPressed: String(im.id === S.image), dataset: { id: im.id } });
    if (im.error) b.append(el("span", { className: "broken", text: "cannot read" }));
    else b.append(el("img", { src: `/api/image/${encodeURIComponent(im.id)}/thumb.png`, alt: "" }));
    b.append(el("span", { className: "name", text: im.name }));
    b.addEventListener("click", () => im.error ? showError(`${im.name}: ${im.error}`) : selectImage(im.id));
    ul.append(el("li", {}, b));
  }
}

async function selectImage(id) {
  S.image = id;
  S.cls = null;
  renderStrip();
  $("photo").src = `/api/image/${encodeURIComponent(id)}/input.png`;
  $("occ-photo").src = $("photo").src;
  $("occ-viewer").hidden = true;
  $("occ-note").textContent = "";
  $("occ-progress").hidden = true;
  S.seq.occ++;  // an occlusion still running for the previous image is not shown here
  const seq = ++S.seq.pred;
  try {
    const { body } = await api(`/api/predict?image=${encodeURIComponent(id)}&k=5`);
    if (seq !== S.seq.pred) return;
    S.top1 = body.predictions[0].index;
    renderTop5(body.predictions);
  } catch (e) { showError(e.message); return; }
  refreshCam();
  refreshChannels();
}

function classButton(index, label, prob) {
  const b = el("button", { type: "button", ariaPressed: String(index === currentClass()), dataset: { class: String(index) } });
  if (prob !== undefined) b.append(el("span", { className: "fill", style: `width:${(100 * prob).toFixed(1)}%` }));
  b.append(el("span", { className: "txt" }, el("span", { text: label }),
    el("span", { className: "p", text: prob !== undefined ? `${(100 * prob).toFixed(1)}%` : `#${index}` })));
  b.addEventListener("click", () => selectClass(index));
  return el("li", {}, b);
}

function renderTop5(preds) {
  $("top5").replaceChildren(...preds.map((p) => classButton(p.index, p.label, p.probability)));
}

const currentClass = () => (S.cls === null ? S.top1 : S.cls);

function markClass() {
  for (const b of document.querySelectorAll(".classes button")) b.setAttribute("aria-pressed", String(Number(b.dataset.class) === currentClass()));
}

function selectClass(index) {
  S.cls = index;
  markClass();
  refreshCam();
}

// ---- class search --------------------------------------------------------------------------
function search() {
  const q = $("search").value.trim().toLowerCase();
  const out = $("search-results");
  if (!q) { out.replaceChildren(); return; }
  // exact name or index first, then names that start with it, then a word that does, then any
  const rank = (name, i) => {
    const n = name.toLowerCase();
    if (n === q || String(i) === q) return 0;
    if (n.startsWith(q)) return 1;
    if (n.split(/[\s,'-]+/).some((w) => w.startsWith(q))) return 2;
    return n.includes(q) ? 3 : -1;
  };
  const hits = S.labels.map((name, i) => [rank(name, i), i]).filter(([r]) => r >= 0)
    .sort((a, b) => a[0] - b[0] || a[1] - b[1]).slice(0, 30).map(([, i]) => i);
  out.replaceChildren(...(hits.length ? hits.map((i) => classButton(i, S.labels[i])) : [el("li", { className: "muted", text: "no class matches" })]));
}

// ---- CAM -------------------------------------------------------------------------------------
function camQuery() {
  const p = new URLSearchParams({ image: S.image, cls: String(currentClass()), method: S.method, layer: S.layer, scale: S.scale });
  return p.toString();
}

async function refreshCam() {
  if (!S.image) return;
  const seq = ++S.seq.cam;
  const t0 = performance.now();
  const q = camQuery();
  $("cam-progress").hidden = true;
  $("dl-png").href = `/api/cam.png?${q}&alpha=${$("opacity").value}`;
  $("dl-npy").href = `/api/cam.npy?${q}`;
  try {
    let r = await api(`/api/cam?${q}`);
    if (r.status === 202) {
      S.camJob = r.body.job;
      $("cam-progress").hidden = false;
      const job = await waitJob(r.body.job, (d, t) => setBar($("cam-bar"), d, t), () => seq !== S.seq.cam);
      if (!job) return;
      $("cam-progress").hidden = true;
      S.camJob = null;
      if (job.state !== "done") { if (job.state === "error") showError(job.error); return; }
      if (seq !== S.seq.cam) return;
      r = await api(`/api/cam?${q}`);
    }
    if (seq !== S.seq.cam) return;
    const c = r.body;
    $("heat").src = c.png;
    $("heat").dataset.key = q;
    $("cam-title").textContent = `${c.label} (${S.titles[c.method] || c.method} at ${c.layer})`;
    $("legend-text").textContent = `${c.vmin.toPrecision(3)} … ${c.vmax.toPrecision(3)}` +
      (S.scale === "raw" ? " (raw: one scale for every class, the top-1 class's maximum)" : " (normalised: this map's min … max)") +
      `; map ${c.raw_shape.join("×")} at the layer`;
    $("timing").textContent = `· server ${c.server_ms} ms, page ${Math.round(performance.now() - t0)} ms`;
    refreshMetrics();
  } catch (e) {
    $("cam-progress").hidden = true;
    if (seq === S.seq.cam) showError(e.message);
  }
}

// ---- channels and feature visualisation --------------------------------------------------------
async function refreshChannels() {
  if (!S.image) return;
  const seq = ++S.seq.ch;
  try {
    const { body } = await api(`/api/channels?image=${encodeURIComponent(S.image)}&layer=${encodeURIComponent(S.layer)}&k=12`);
    if (seq !== S.seq.ch) return;
    $("channels-note").textContent = `The 12 most active of ${body.count} channels of ${body.layer} for this image ` +
      "(one colour scale). Click one to see what it wants.";
    $("channels").replaceChildren(...body.channels.map((c) => {
      const b = el("button", { type: "button", title: `channel ${c.channel}, mean activation ${c.mean.toPrecision(3)}`,
        ariaPressed: "false", dataset: { channel: String(c.channel), layer: body.layer } },
        el("img", { src: c.png, alt: `channel ${c.channel}` }), el("span", { text: `c${c.channel}` }));
      b.addEventListener("click", () => showFeature(body.layer, c.channel, b));
      return b;
    }));
  } catch (e) { if (seq === S.seq.ch) showError(e.message); }
}

async function showFeature(layer, channel, button) {
  for (const b of $("channels").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === button));
  const seq = ++S.seq.feat;
  $("feature").hidden = false;
  $("feature-title").textContent = `What ${layer} channel ${channel} wants`;
  $("feature-img").removeAttribute("src");
  $("feature-img").alt = `feature visualisation of ${layer} channel ${channel}`;
  $("feature-note").textContent = "";
  $("feature-progress").hidden = true;
  try {
    let r = await post("/api/features", { layer, channel });
    if (r.status === 202) {
      S.featureJob = r.body.job;
      $("feature-progress").hidden = false;
      $("feature-note").textContent = "optimising an image (once per layer and channel, then cached)…";
      const job = await waitJob(r.body.job, (d, t) => setBar($("feature-bar"), d, t), () => seq !== S.seq.feat);
      if (!job) return;
      $("feature-progress").hidden = true;
      S.featureJob = null;
      if (job.state !== "done") { $("feature-note").textContent = job.state === "error" ? job.error : "cancelled"; return; }
      r = await post("/api/features", { layer, channel });
    }
    if (seq !== S.seq.feat) return;
    $("feature-img").src = r.body.png;
    $("feature-note").textContent = `channel mean reached: ${r.body.objective.toPrecision(3)}` + (r.body.dead ? " (dead unit)" : "");
  } catch (e) {
    $("feature-progress").hidden = true;
    if (seq === S.seq.feat) showError(e.message);
  }
}

// ---- occlusion ----------------------------------------------------------------------------------
async function runOcclusion() {
  if (!S.image) return;
  const data = { image: S.image, cls: currentClass(), patch: Number($("patch").value), stride: Number($("stride").value) };
  const seq = ++S.seq.occ;
  const stale = () => seq !== S.seq.occ;
  $("occ-note").textContent = "";
  $("occ-progress").hidden = true;
  try {
    let r = await post("/api/occlusion", data);
    if (r.status === 202) {
      S.occJob = r.body.job;
      $("occ-progress").hidden = false;
      const job = await waitJob(r.body.job, (d, t) => setBar($("occ-bar"), d, t), stale);
      if (!job) return;
      $("occ-progress").hidden = true;
      S.occJob = null;
      if (job.state !== "done") { $("occ-note").textContent = job.state === "error" ? job.error : "cancelled"; return; }
      r = await post("/api/occlusion", data);
    }
    if (stale()) return;
    const o = r.body;
    $("occ-viewer").hidden = false;
    $("occ-heat").src = o.png;
    $("occ-note").textContent = `${o.label}: ${o.windows} windows of ${o.patch} px every ${o.stride} px; ` +
      `largest drop ${o.max_drop.toPrecision(3)}, largest rise ${(-o.min_drop).toPrecision(3)}`;
  } catch (e) {
    if (stale()) return;
    $("occ-progress").hidden = true;
    showError(e.message);
  }
}

async function cancel(job) {
  if (job) { try { await api(`/api/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }); } catch (e) { showError(e.message); } }
}

// ---- deletion / insertion ------------------------------------------------------------------------
function refreshMetrics() {
  const box = $("metrics");
  S.seq.curves = (S.seq.curves || 0) + 1;
  const b = el("button", { type: "button", id: "curves-run", text: "Curves of this map" });
  b.addEventListener("click", computeCurves);
  box.replaceChildren(el("p", { className: "muted", text: "The class's probability as the map's most salient pixels are removed " +
    "(deletion: lower is better) or restored (insertion: higher is better)." }), b);
}

async function computeCurves() {
  const box = $("metrics");
  const seq = S.seq.curves;
  const stale = () => seq !== S.seq.curves;
  const q = camQuery();
  const bar = el("progress", { max: 1 });
  box.replaceChildren(bar);
  try {
    let r = await api(`/api/metrics?${q}`);
    if (r.status === 202) {
      const job = await waitJob(r.body.job, (d, t) => setBar(bar, d, t), stale);
      if (!job) return;
      if (job.state !== "done") { box.replaceChildren(el("p", { className: "muted", text: job.error || job.state })); return; }
      r = await api(`/api/metrics?${q}`);
    }
    if (!stale()) drawCurves(box, r.body);
  } catch (e) {
    if (!stale()) box.replaceChildren(el("p", { className: "muted", text: e.message }));
  }
}

// {deletion: {x: [...], y: [...], auc}, insertion: {...}} as two polylines in one SVG
function drawCurves(box, data) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 320 204");
  svg.setAttribute("role", "img");
  const colours = { deletion: "#c0392b", insertion: "#2456c7" };
  const frame = document.createElementNS(NS, "rect");
  for (const [k, v] of Object.entries({ x: 20, y: 15, width: 290, height: 170, class: "frame" })) frame.setAttribute(k, v);
  svg.append(frame);
  for (const [x, y, t, anchor] of [[20, 198, "0", "start"], [310, 198, "all pixels", "end"], [16, 19, "1", "end"], [16, 187, "0", "end"]]) {
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", x); label.setAttribute("y", y); label.setAttribute("text-anchor", anchor);
    label.textContent = t;
    svg.append(label);
  }
  const parts = [];
  for (const [name, c] of Object.entries(data)) {
    if (!c || !c.x) continue;
    const pts = c.x.map((x, i) => `${20 + 290 * x},${185 - 170 * c.y[i]}`).join(" ");
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colours[name] || "#444");
    line.setAttribute("stroke-width", "2");
    svg.append(line);
    parts.push([`${name} AUC ${Number(c.auc).toPrecision(3)}`, colours[name] || "#444"]);
  }
  svg.setAttribute("aria-label", parts.map((p) => p[0]).join(", "));
  const caption = el("p", { className: "muted" });
  parts.forEach(([text, colour], i) => {
    const span = el("span", { text: (i ? " · " : "") + "— " + text });
    span.style.color = colour;
    caption.append(span);
  });
  box.replaceChildren(svg, caption);
  if (data.verdict) {  // the verdict in words: trust / weak / do not trust, and why
    const v = el("p", { className: "verdict" });
    v.append(el("span", { className: `level ${data.verdict.level.replace(/ /g, "-")}`, text: data.verdict.level }),
      " " + data.verdict.reasons.join(" "));
    box.append(v);
  }
}

// ---- upload ---------------------------------------------------------------------------------------
async function upload(file) {
  if (!file) return;
  clearError();
  try {
    const { body } = await api("/api/upload", { method: "POST", body: file,
      headers: { "x-filename": encodeURIComponent(file.name || "upload"), "content-type": "application/octet-stream" } });
    S.images.push(body);
    await selectImage(body.id);
  } catch (e) {
    showError(e.message.startsWith(`${file.name}: `) ? e.message : `${file.name}: ${e.message}`);
  } finally {
    $("upload-input").value = "";
  }
}

// ---- start -------------------------------------------------------------------------------------------
async function init() {
  $("error-close").addEventListener("click", clearError);
  $("search").addEventListener("input", search);
  $("search").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { const first = $("search-results").querySelector("button"); if (first) first.click(); }
  });
  $("method").addEventListener("change", () => { S.method = $("method").value; refreshCam(); });
  $("layer").addEventListener("change", () => { S.layer = $("layer").value; refreshCam(); refreshChannels(); });
  $("opacity").addEventListener("input", () => {
    $("heat").style.opacity = $("opacity").value;
    $("dl-png").href = `/api/cam.png?${camQuery()}&alpha=${$("opacity").value}`;
  });
  for (const r of document.querySelectorAll("input[name=scale]")) r.addEventListener("change", () => { S.scale = r.value; refreshCam(); });
  $("cam-cancel").addEventListener("click", () => cancel(S.camJob));
  $("feature-cancel").addEventListener("click", () => cancel(S.featureJob));
  $("occ-cancel").addEventListener("click", () => cancel(S.occJob));
  $("occ-run").addEventListener("click", runOcclusion);
  $("upload-input").addEventListener("change", (e) => upload(e.target.files[0]));
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("dragging"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  $("heat").style.opacity = $("opacity").value;
  try {
    const [{ body: st }, { body: labels }] = await Promise.all([api("/api/state"), api("/api/labels")]);
    S.images = st.images;
    S.labels = labels;
    S.layer = st.default_layer;
    S.titles = st.titles;
    $("model").textContent = `${st.model} on ${st.device} · ${labels.length} classes`;
    $("method").replaceChildren(...st.methods.map((m) => el("option", { value: m,
      text: (st.titles[m] || m) + (st.instant_methods.includes(m) ? "" : " (slow)") })));
    $("layer").replaceChildren(...st.layers.map((l) => el("option", { value: l.name,
      text: `${l.name} ${l.shape.join("×")}${l.name === st.default_layer ? " (default)" : ""}` })));
    $("layer").value = st.default_layer;
    renderStrip();
    const first = S.images.find((im) => !im.error);
    if (first) await selectImage(first.id);
    document.body.dataset.ready = "1";
  } catch (e) { showError(e.message); }
}

document.addEventListener("DOMContentLoaded", init);
