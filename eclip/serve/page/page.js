// The eclip page: plain JavaScript against the same HTTP API as everyone else
// (POST /match, GET|POST /search, GET /image/ID, GET /health). Data is shown with
// textContent only, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let matchFile = null;

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

async function loadHealth() {
  try {
    const h = await call("/health");
    const m = h.model || {};
    const what = m.checkpoint ? `checkpoint ${m.checkpoint}` : `${m.model || m.name} (${m.pretrained || "random weights"})`;
    $("model-line").textContent = `model: ${what} · eclip ${h.version}`;
    if (!h.gallery || !h.gallery.images) {
      $("search-panel").classList.add("disabled");
      $("gallery-line").textContent = h.gallery
        ? "This gallery holds no image embeddings."
        : "No gallery: start the server with --gallery DIR (a folder written by eclip embed) to search one.";
      for (const el of $("search-form").elements) el.disabled = true;
    } else {
      $("gallery-line").textContent = `${h.gallery.images} images` +
        (h.gallery.texts ? ` and ${h.gallery.texts} captions` : "") + " in the gallery.";
    }
  } catch (e) {
    $("model-line").textContent = `server not reachable: ${e.message}`;
  }
}

function setMatchFile(file) {
  if (!file) return;
  matchFile = file;
  const preview = $("match-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("match-drop-text").textContent = file.name;
}

function wireDrop(zone, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFile(e.dataTransfer.files[0]);
  });
}

async function scoreCaptions(event) {
  event.preventDefault();
  show($("match-error"), "");
  const captions = $("captions").value.split("\n").map((c) => c.trim()).filter((c) => c);
  if (!matchFile) return show($("match-error"), "Choose or drop a photo first.");
  if (!captions.length) return show($("match-error"), "Type at least one caption.");
  const threshold = parseFloat($("threshold").value);
  const form = new FormData();
  form.append("image", matchFile, matchFile.name);
  for (const c of captions) form.append("caption", c);
  if (!Number.isNaN(threshold)) form.append("threshold", String(threshold));
  $("match-button").disabled = true;
  try {
    renderMatches(await call("/match", { method: "POST", body: form }), threshold);
  } catch (e) {
    show($("match-error"), e.message);
    $("match-results").hidden = true;
    show($("match-verdict"), "");
  } finally {
    $("match-button").disabled = false;
  }
}

function renderMatches(result, threshold) {
  const body = $("match-results").querySelector("tbody");
  body.replaceChildren();
  const matches = result.results[0].matches;     // best first, as the server sends them
  matches.forEach((m, i) => {
    const row = body.insertRow();
    row.className = i === 0 ? "best" : "";
    row.insertCell().textContent = String(i + 1);
    row.insertCell().textContent = m.text;
    const score = row.insertCell();
    score.className = "score";
    score.textContent = m.score.toFixed(4);
    const share = row.insertCell();
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(100 * m.prob)}%`;
    share.append(bar, ` ${(100 * m.prob).toFixed(1)}%`);
    const verdict = row.insertCell();
    if (Number.isNaN(threshold)) {
      verdict.textContent = "–";
    } else {
      const ok = m.score >= threshold;
      verdict.textContent = ok ? "match" : "below";
      verdict.className = ok ? "pass" : "fail";
    }
  });
  $("match-results").hidden = false;
  const best = result.best;
  show($("match-verdict"), result.passed === null
    ? `Best: “${best.text}” (${best.score.toFixed(4)}).`
    : `Best: “${best.text}” (${best.score.toFixed(4)}) ${result.passed ? "reaches" : "stays below"} ` +
      `the threshold ${result.threshold}.`);
  $("match-verdict").className = "verdict " + (result.passed === false ? "fail" : "pass");
}

async function search(request) {
  show($("search-error"), "");
  show($("search-note"), "");
  $("grid").replaceChildren();
  try {
    const result = await request();
    const r = result.results[0];
    show($("search-note"), `Top ${r.matches.length} of ${result.counts.images} images for ` +
      (r.kind === "text" ? `“${r.query}”` : `the photo ${r.query}`) + ".");
    for (const m of r.matches) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = m.thumbnail;
      img.alt = m.id;
      img.loading = "lazy";
      const caption = document.createElement("figcaption");
      // a record id says more than a file name (demo sets repeat 5.jpg); an id that is the path does not
      const name = m.id && m.id !== m.path ? String(m.id) : String(m.path || m.id).split("/").pop();
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = `${m.rank}. ${name}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = m.score.toFixed(4);
      caption.append(label, score);
      caption.title = `${m.id} (${m.score.toFixed(4)})`;
      figure.append(img, caption);
      $("grid").append(figure);
    }
  } catch (e) {
    show($("search-error"), e.message);
  }
}

function searchByCaption(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return show($("search-error"), "Type a caption to search for.");
  search(() => call(`/search?q=${encodeURIComponent(q)}&k=12`));
}

function searchByPhoto(file) {
  if (!file) return;
  $("query").value = "";
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", "12");
  search(() => call("/search", { method: "POST", body: form }));
}

$("match-file").addEventListener("change", (e) => setMatchFile(e.target.files[0]));
wireDrop($("match-drop"), setMatchFile);
$("match-form").addEventListener("submit", scoreCaptions);
$("search-form").addEventListener("submit", searchByCaption);
$("search-file").addEventListener("change", (e) => searchByPhoto(e.target.files[0]));
wireDrop($("search-panel"), searchByPhoto);
loadHealth();
