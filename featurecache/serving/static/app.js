// The featurecache page: the served run's facts, and labels for images dropped on it.
// Plain JavaScript, no build step and no library, so the page works offline straight from the package.
// Each image is its own POST /predict, so one bad file gets its own error and the others still answer
// (the server micro-batches concurrent requests, so this costs it little).
"use strict";

const TOKEN_KEY = "featurecache-token";  // sessionStorage: gone when the tab closes, never on disk
const IN_FLIGHT = 4;                       // uploads at a time; the server batches them together
const $ = (id) => document.getElementById(id);

class NeedsToken extends Error {}

let runs = [];

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

// fetch with the token, if any; a 401 asks the person for it (once per refusal) and throws NeedsToken.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    const refused = sessionStorage.getItem(TOKEN_KEY) !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    askToken(refused ? "That token was refused; try again." : "");
    throw new NeedsToken("the server needs its token; enter it above, then drop the file again");
  }
  return response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON: fall through */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

function askToken(message) {
  $("token-box").hidden = false;
  $("run-box").hidden = $("upload-box").hidden = true;
  $("token-error").textContent = message;
  $("status").textContent = "locked";
  $("token").focus();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function currentRun() { return $("run").value; }

// ---- the run ----------------------------------------------------------------------------------------
async function loadRuns() {
  const response = await api("/runs");
  if (!response.ok) throw new Error(await errorOf(response));
  runs = (await response.json()).runs;
  const select = $("run");
  select.replaceChildren(...runs.map((r) => el("option", { value: r.run, text: `${r.run} (${r.head})` })));
  select.disabled = runs.length < 2;
  $("token-box").hidden = true;
  $("run-box").hidden = $("upload-box").hidden = false;
  await showRun();
}

async function showRun() {
  const run = runs.find((r) => r.run === currentRun());
  const response = await api(`/info?run=${encodeURIComponent(run.run)}`);
  if (!response.ok) throw new Error(await errorOf(response));
  const info = await response.json();
  const m = info.metrics || {};
  const facts = [
    ["run", run.run],
    ["method", run.method],
    ["test accuracy", pct(m.test_accuracy)],
    ["train accuracy", pct(m.train_accuracy)],
    ["classes", info.class_names.join(", ")],
    ["engine", `${info.engine} (${info.precision})`],
    ["cached images", `${info.feature_set.stored_images} in feature set ${info.feature_set.id}`],
  ];
  $("run-info").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v ?? "–" })]));
  $("confusion").replaceChildren(confusionTable(m.confusion_matrix || [], info.class_names));
  $("status").textContent = `${runs.length} run${runs.length > 1 ? "s" : ""} served`;
  // When the run's facts are first on screen: scripts/bench_serve.py reads it as the page's load time.
  if (!performance.getEntriesByName("featurecache:ready").length) performance.mark("featurecache:ready");
}

function pct(x) { return typeof x === "number" ? `${(100 * x).toFixed(2)}%` : "–"; }

function confusionTable(matrix, names) {
  const table = el("table", { class: "confusion" });
  table.append(el("tr", {}, el("th", { text: "true \\ predicted" }), ...names.map((n) => el("th", { text: n }))));
  matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    table.append(el("tr", {}, el("th", { text: names[i] }), ...row.map((count, j) => {
      const cell = el("td", { text: String(count), class: i === j ? "diag" : "" });
      cell.style.background = `rgba(47, 111, 179, ${(0.6 * count / total).toFixed(3)})`;
      return cell;
    })));
  });
  return table;
}

// ---- images -----------------------------------------------------------------------------------------
function card(file) {
  const item = el("li", { class: "card", "data-file": file.name, "data-state": "pending" });
  const img = el("img", { alt: "" });
  img.src = URL.createObjectURL(file);
  img.onload = () => URL.revokeObjectURL(img.src);
  img.onerror = () => { URL.revokeObjectURL(img.src); img.classList.add("broken"); };
  item.append(img, el("div", {}, el("div", { class: "name", text: file.name }),
                      el("div", { class: "meta", text: "waiting…" }), el("ol"), el("p", { class: "error" })));
  return item;
}

function showPrediction(item, prediction, ms) {
  const top = prediction.top;
  const probability = prediction.score_kind === "probability";
  // Decision scores can be negative: their bars span the row's own range instead of 0..1.
  const lo = probability ? 0 : Math.min(0, ...top.map((t) => t.score));
  const hi = probability ? 1 : Math.max(...top.map((t) => t.score));
  const width = (s) => `${Math.max(0, Math.min(1, (s - lo) / ((hi - lo) || 1))) * 100}%`;
  item.querySelector("ol").replaceChildren(...top.map((t) => el("li", {},
    el("span", { class: "label", text: t.label }),
    el("span", { class: "bar" }, Object.assign(el("span"), { style: `width: ${width(t.score)}` })),
    el("span", { class: "score", text: probability ? t.score.toFixed(3) : t.score.toFixed(2) }))));
  item.querySelector(".meta").textContent =
    `${ms.toFixed(0)} ms${prediction.cached ? " · from the cache" : ""} · ${prediction.score_kind}`;
  item.dataset.label = prediction.label;
  item.dataset.state = "done";
}

function showError(item, message, ms) {
  item.querySelector(".error").textContent = message;
  item.querySelector(".meta").textContent = ms === undefined ? "not sent" : `${ms.toFixed(0)} ms`;
  item.dataset.state = "error";
}

async function upload(file, item) {
  const form = new FormData();
  form.append("files", file, file.name);
  const query = `run=${encodeURIComponent(currentRun())}&top=${$("top").value}`;
  item.querySelector(".meta").textContent = "sending…";
  const t0 = performance.now();
  try {
    const response = await api(`/predict?${query}`, { method: "POST", body: form });
    const ms = performance.now() - t0;
    if (!response.ok) return showError(item, await errorOf(response), ms);
    showPrediction(item, (await response.json()).predictions[0], ms);
  } catch (e) {
    showError(item, e instanceof NeedsToken ? e.message : `request failed: ${e.message}`);
  }
}

async function uploadAll(files) {
  const queue = [...files].map((file) => [file, card(file)]);
  $("results").prepend(...queue.map(([, item]) => item));  // the newest batch on top, in the order chosen
  const worker = async () => { while (queue.length) { const [file, item] = queue.shift(); await upload(file, item); } };
  await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, queue.length) }, worker));
}

// ---- wiring -----------------------------------------------------------------------------------------
function start() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    loadRuns().catch(fail);
  });
  $("run").addEventListener("change", () => showRun().catch(fail));
  $("files").addEventListener("change", (event) => {
    uploadAll(event.target.files);
    event.target.value = "";  // choosing the same files again fires `change` again
  });
  $("clear").addEventListener("click", () => $("results").replaceChildren());
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    uploadAll(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("files").click(); });
  loadRuns().catch(fail);
}

function fail(e) {
  if (e instanceof NeedsToken) return;  // the token form is showing
  $("error").textContent = String(e.message || e);
  $("status").textContent = "error";
}

start();
