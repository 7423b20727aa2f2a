// zdproxy dashboard: plain JavaScript, no build step, no third-party code.
//
// Asks for the admin token (kept in this tab's sessionStorage only), then polls
// the admin API once a second: /api/v1/services (which services there are),
// then the shown service's state (pools, backends, live figures),
// rollouts/current and events. The traffic chart's series is
// kept here, in the page, from those polls. Every change goes through the same
// API as `zdproxy ctl`; large traffic moves ask for confirmation first.
//
// Services: with only the service "default", every call uses the un-prefixed
// paths (/api/v1/state...). Otherwise a selector picks the service (kept in
// sessionStorage) and every call goes to /api/v1/services/{name}/...
"use strict";

const KEY = "zdproxy-admin-token";
const SERVICE_KEY = "zdproxy-service";
const POLL_MS = 1000;
const CHART_SECONDS = 300;
/** a split moving at least this many points of traffic asks first */
const CONFIRM_POINTS = 50;

const $ = (id) => document.getElementById(id);

const view = {
  state: null,
  readOnly: false,
  pools: new Map(), // pool name -> {card, rows: Map(backend id -> row)}
  colors: new Map(), // pool name -> palette index
  series: [], // [{t: seconds, rates: {pool: requests/s}}]
  lastTotals: null, // {t, totals: {pool: requests_total}}
  splitDirty: false,
  timer: null,
  /** the service shown; null: the un-prefixed API (only the service default) */
  service: null,
  services: [], // names, in the API's order
};

/** Where the shown service's endpoints are. */
function base() {
  return view.service === null ? "/api/v1" : `/api/v1/services/${encodeURIComponent(view.service)}`;
}

// ---- small DOM helpers -------------------------------------------------------

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function fmtRate(x) {
  if (x === null || x === undefined) return "–";
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

function fmtPercent(ratio) {
  if (ratio === null || ratio === undefined) return "–";
  const p = ratio * 100;
  return (p === 0 ? "0" : p < 0.1 ? p.toFixed(3) : p.toFixed(1)) + " %";
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(ms >= 10 ? 0 : 1) + " ms";
}

function fmtDuration(seconds) {
  if (typeof seconds !== "number") return String(seconds);
  if (seconds < 120) return `${+seconds.toFixed(3)} s`;
  const minutes = seconds / 60;
  return `${Number.isInteger(minutes) ? minutes : minutes.toFixed(1)} min`;
}

function fmtAgo(unixSeconds) {
  if (!unixSeconds) return "";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  return s < 60 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}

function fmtTime(iso) {
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString();
}

// ---- messages ----------------------------------------------------------------

function showBanner(id, message) {
  $(id).hidden = !message;
  $(id).textContent = message || "";
}
function showError(message, kind) {
  showBanner("error", message);
  $("error").dataset.kind = kind || "";
}

let flashTimer = null;
function flash(message) {
  showBanner("flash", message);
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => showBanner("flash", ""), 4000);
}

// ---- the API -----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "cannot reach the admin API: " + e.message);
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.error || response.statusText);
  return data;
}

/** A token the API refuses for reads is of no use: forget it and show the form. */
function authFailed(error) {
  const why =
    error.status === 403
      ? `The token was refused (${error.message}). Check the token and sign in again.`
      : `Not signed in (${error.message}).`;
  signOut(why);
}

/** Forget what the page shows of a service (another one is shown next). */
function clearView() {
  view.state = null;
  view.series = [];
  view.lastTotals = null;
  view.splitDirty = false;
  view.pools.clear();
  view.colors.clear();
  $("pools").replaceChildren();
  $("split-inputs").replaceChildren();
  $("events").querySelector("tbody").replaceChildren();
  $("rollout-body").replaceChildren();
  $("chart").replaceChildren();
  $("legend").replaceChildren();
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  clearTimeout(view.timer);
  clearView();
  view.services = [];
  view.service = null;
  $("service").replaceChildren();
  $("service-pick").hidden = true;
  $("meta").textContent = $("whoami").textContent = $("updated").textContent = "";
  showBanner("notice", "");
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  showError(message);
  $("token").focus();
}

/** Run an operator change, then refresh; a refusal is shown, the page stays. */
async function act(method, path, body, done) {
  try {
    await api(method, path, body);
    showError("");
    if (done) flash(done);
  } catch (e) {
    if (e.status === 401) return authFailed(e);
    showError(`${method} ${path}: ${e.message}`);
  }
  await refresh();
}

// ---- polling -----------------------------------------------------------------

/** Which service to show, from /api/v1/services: with only "default", none
 * (the un-prefixed API); otherwise the one chosen before, else default, else
 * the first. */
function pickService(listing) {
  const names = listing.services.map((s) => s.name);
  const single = names.length === 1 && names[0] === listing.default;
  let wanted = null;
  if (!single) {
    const chosen = sessionStorage.getItem(SERVICE_KEY);
    wanted = names.includes(chosen) ? chosen : names.includes(listing.default) ? listing.default : names[0];
  }
  renderServices(single ? [] : names, wanted);
  if (wanted !== view.service) {
    clearView();
    view.service = wanted;
  }
}

function renderServices(names, wanted) {
  const select = $("service");
  if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    select.replaceChildren(...names.map((n) => el("option", n)));
  }
  if (wanted !== null) select.value = wanted;
  $("service-pick").hidden = names.length === 0;
  view.services = names;
}

function chooseService() {
  const name = $("service").value;
  if (name === view.service) return;
  sessionStorage.setItem(SERVICE_KEY, name);
  clearView();
  view.service = name;
  showError("");
  refresh();
}

async function refresh() {
  clearTimeout(view.timer);
  if (!sessionStorage.getItem(KEY)) return signOut("");
  try {
    pickService(await api("GET", "/api/v1/services"));
    const service = view.service;
    const at = base();
    const [state, events, rollout] = await Promise.all([
      api("GET", `${at}/state`),
      api("GET", `${at}/events?limit=50`),
      api("GET", `${at}/rollouts/current`).catch((e) => {
        if (e.status === 404 || e.status === 501) return null;
        throw e;
      }),
    ]);
    if (!sessionStorage.getItem(KEY)) return; // signed out meanwhile
    if (service !== view.service) return; // another service was chosen meanwhile: its refresh runs
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    if ($("error").dataset.kind === "connection") showError("");
    render(state, events.events, rollout ? rollout.rollout : null);
  } catch (e) {
    if (e.status === 401 || e.status === 403) return authFailed(e);
    showError(e.message, "connection");
  }
  // one polling chain: a refresh after a change replaces the pending one
  clearTimeout(view.timer);
  view.timer = setTimeout(refresh, POLL_MS);
}

function render(state, events, rollout) {
  view.state = state;
  const token = state.token || { name: "?", role: "write" };
  view.readOnly = token.role !== "write";
  document.body.classList.toggle("readonly", view.readOnly);
  const shown = view.service === null ? "" : `service ${view.service} · `;
  $("meta").textContent = shown + `version ${state.version} · pid ${state.pid} · generation ${state.generation}`;
  $("whoami").textContent = `token: ${token.name} (${token.role})`;
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  showBanner(
    "notice",
    view.readOnly
      ? `Signed in with the read-only token "${token.name}": changes are disabled.`
      : state.persistence && state.persistence.last_error
        ? `State file: ${state.persistence.last_error}`
        : "",
  );
  recordSeries(state);
  renderChart();
  renderSplit(state);
  renderPools(state);
  renderRollout(rollout);
  renderEvents(events);
  for (const button of document.querySelectorAll("button.mutate")) {
    if (view.readOnly) button.disabled = true;
  }
}

// ---- traffic chart (series kept in the page) ----------------------------------

function colorOf(pool) {
  if (!view.colors.has(pool)) view.colors.set(pool, view.colors.size % 6);
  return "c" + view.colors.get(pool);
}

function recordSeries(state) {
  const t = performance.now() / 1000;
  const totals = {};
  for (const [name, pool] of Object.entries(state.pools)) {
    totals[name] = pool.traffic ? pool.traffic.requests_total : 0;
  }
  const last = view.lastTotals;
  view.lastTotals = { t, totals };
  if (!last || t - last.t <= 0) return;
  const rates = {};
  for (const [name, total] of Object.entries(totals)) {
    const before = last.totals[name];
    // a pool that just appeared (or whose counters restarted) has no rate yet
    if (before !== undefined && total >= before) rates[name] = (total - before) / (t - last.t);
  }
  view.series.push({ t, rates });
  while (view.series.length && view.series[0].t < t - CHART_SECONDS) view.series.shift();
}

function niceMax(x) {
  if (x <= 1) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (x <= m * p) return m * p;
  return 10 * p;
}

function renderChart() {
  const chart = $("chart");
  const W = 720, H = 180, L = 48, R = 10, T = 10, B = 22;
  const now = performance.now() / 1000;
  let peak = 0;
  for (const point of view.series) for (const r of Object.values(point.rates)) peak = Math.max(peak, r);
  const top = niceMax(peak);
  const x = (t) => L + ((t - (now - CHART_SECONDS)) / CHART_SECONDS) * (W - L - R);
  const y = (r) => T + (1 - r / top) * (H - T - B);
  const nodes = [];
  for (const frac of [0, 0.5, 1]) {
    const yy = y(top * frac);
    nodes.push(svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid" }));
    nodes.push(svg("text", { x: L - 6, y: yy + 4, "text-anchor": "end", class: "axis" }, fmtRate(top * frac)));
  }
  for (const [label, t] of [["-5 min", now - 300], ["-2.5 min", now - 150], ["now", now]]) {
    nodes.push(svg("text", { x: x(t), y: H - 6, "text-anchor": "middle", class: "axis" }, label));
  }
  const pools = view.state ? Object.keys(view.state.pools) : [];
  const legend = [];
  for (const name of pools) {
    const points = view.series
      .filter((p) => p.rates[name] !== undefined)
      .map((p) => `${x(p.t).toFixed(1)},${y(p.rates[name]).toFixed(1)}`);
    const line = svg("polyline", { points: points.join(" "), class: colorOf(name) });
    line.dataset.pool = name;
    nodes.push(line);
    const latest = view.series.length ? view.series[view.series.length - 1].rates[name] : undefined;
    const item = el("li");
    item.append(el("span", null, "swatch " + colorOf(name)), el("span", `${name}: ${fmtRate(latest)} req/s`));
    legend.push(item);
  }
  chart.replaceChildren(...nodes);
  $("legend").replaceChildren(...legend);
}

// ---- split -------------------------------------------------------------------

function splitInputs() {
  return [...$("split-inputs").querySelectorAll("input")];
}

function renderSplit(state) {
  const names = Object.keys(state.pools).filter((n) => state.pools[n].weight !== undefined);
  const box = $("split-inputs");
  const current = splitInputs().map((i) => i.dataset.pool);
  if (current.join("\n") !== names.join("\n")) {
    box.replaceChildren();
    for (const name of names) {
      const label = el("label", name + " ");
      const input = el("input");
      input.type = "number";
      input.min = "0";
      input.max = "100";
      input.step = "1";
      input.dataset.pool = name;
      input.addEventListener("input", () => {
        view.splitDirty = true;
        syncRange();
        updateSplitSum();
      });
      label.append(input, document.createTextNode(" %"));
      box.append(label);
    }
    view.splitDirty = false;
  }
  if (!view.splitDirty) {
    for (const input of splitInputs()) input.value = state.pools[input.dataset.pool].weight;
  }
  // two pools: a slider moves traffic from one to the other
  $("split-range").hidden = names.length !== 2;
  if (!view.splitDirty) syncRange();
  for (const input of splitInputs()) input.disabled = view.readOnly;
  $("split-range").disabled = view.readOnly;
  updateSplitSum();
}

function syncRange() {
  const inputs = splitInputs();
  if (inputs.length === 2) $("split-range").value = inputs[1].value;
}

function wantedSplit() {
  const wanted = {};
  for (const input of splitInputs()) wanted[input.dataset.pool] = Number(input.value);
  return wanted;
}

function updateSplitSum() {
  const wanted = wantedSplit();
  const values = Object.values(wanted);
  const sum = values.reduce((a, b) => a + b, 0);
  const valid = values.every((v) => Number.isInteger(v) && v >= 0 && v <= 100) && sum === 100;
  const current = view.state ? view.state.pools : {};
  const changed = Object.entries(wanted).some(([n, w]) => !current[n] || current[n].weight !== w);
  $("split-sum").textContent = `sum ${sum} %`;
  $("split-sum").classList.toggle("bad", !valid);
  $("split-apply").disabled = view.readOnly || !valid || !changed;
}

function describeMove(from, to) {
  return Object.keys(to)
    .map((n) => `${n} ${from[n] ?? 0} % → ${to[n]} %`)
    .join(", ");
}

/** Whether a change of weights needs the operator's confirmation, and why. */
function largeMove(from, to) {
  let moved = 0;
  let toAll = null;
  for (const [name, weight] of Object.entries(to)) {
    moved = Math.max(moved, Math.abs(weight - (from[name] ?? 0)));
    if (weight === 100 && from[name] !== 100) toAll = name;
  }
  if (toAll !== null) return `This sends 100 % of new traffic to ${toAll}.`;
  if (moved >= CONFIRM_POINTS) return `This moves ${moved} points of traffic at once.`;
  return null;
}

function currentWeights() {
  const from = {};
  for (const [name, pool] of Object.entries(view.state.pools)) from[name] = pool.weight;
  return from;
}

async function applySplit(event) {
  event.preventDefault();
  if (!view.state || view.readOnly) return;
  const to = wantedSplit();
  const from = currentWeights();
  const why = largeMove(from, to);
  const summary = describeMove(from, to);
  if (why && !window.confirm(`${why}\n\n${summary}\n\nApply this split?`)) {
    flash("Split not applied.");
    return;
  }
  view.splitDirty = false;
  await act("PUT", `${base()}/split`, to, `Split applied: ${summary}`);
}

async function flipTo(name) {
  if (!view.state || view.readOnly) return;
  const from = currentWeights();
  const to = {};
  for (const n of Object.keys(from)) to[n] = n === name ? 100 : 0;
  const summary = describeMove(from, to);
  if (!window.confirm(`Flip: 100 % of new traffic to ${name} at once; the other pools drain.\n\n${summary}\n\nFlip now?`)) {
    flash("Flip cancelled.");
    return;
  }
  view.splitDirty = false;
  await act("POST", `${base()}/flip`, { to: name }, `Flipped to ${name}.`);
}

// ---- pools and backends ------------------------------------------------------

const BACKEND_COLUMNS = [
  ["backend", ""], ["state", ""], ["health checks", ""], ["in flight", "num"],
  ["req/s", "num"], ["errors", "num"], ["requests", "num"], ["weight", "num"], ["", ""],
];

function poolCard(name) {
  const card = el("div", null, "pool");
  card.dataset.pool = name;
  const head = el("div", null, "pool-head");
  const title = el("h3");
  title.append(el("span", null, "swatch " + colorOf(name)), document.createTextNode(name));
  const weight = el("span", "", "pool-weight");
  const figures = el("div", null, "figures");
  const fig = {};
  for (const [key, label] of [
    ["rps", "req/s"], ["errors", "errors"], ["p50", "p50"], ["p99", "p99"], ["inflight", "in flight"],
    ["usable", ""],
  ]) {
    const item = el("span");
    const value = el("b", "", key);
    item.append(document.createTextNode(label ? label + " " : ""), value);
    figures.append(item);
    fig[key] = value;
  }
  const flip = el("button", `Flip to ${name}`, "flip mutate");
  flip.type = "button";
  flip.addEventListener("click", () => flipTo(name));
  head.append(title, weight, figures, flip);
  const table = el("table", null, "backends");
  const headRow = el("tr");
  for (const [label, cls] of BACKEND_COLUMNS) headRow.append(el("th", label, cls));
  const thead = el("thead");
  thead.append(headRow);
  table.append(thead, el("tbody"));
  card.append(head, table);
  return { card, weight, fig, flip, tbody: table.querySelector("tbody"), rows: new Map() };
}

function backendRow(b) {
  const row = el("tr");
  row.dataset.backend = b.id;
  const cells = {};
  for (const key of ["id", "state", "health", "inflight", "rps", "errors", "requests", "weight", "actions"]) {
    const cls = ["inflight", "rps", "errors", "requests", "weight"].includes(key) ? "num " + key : key;
    cells[key] = el("td", null, cls);
    row.append(cells[key]);
  }
  const buttons = {};
  for (const verb of ["drain", "disable", "enable"]) {
    const button = el("button", verb, "mutate " + verb);
    button.type = "button";
    button.addEventListener("click", () =>
      act("POST", `${base()}/backends/${encodeURIComponent(b.id)}/${verb}`, undefined, `${verb}: ${b.id}`),
    );
    cells.actions.append(button);
    buttons[verb] = button;
  }
  return { row, cells, buttons };
}

/** "up · 200 in 3 ms, 2 s ago" and the rise/fall progress toward the next state. */
function healthText(b) {
  const hc = b.health_checks;
  if (!hc || !hc.checked) return { text: "not checked", detail: "", bad: false };
  let last = "no check yet";
  if (hc.last_check) {
    const took = hc.last_duration_ms !== null && hc.last_duration_ms !== undefined ? ` in ${fmtMs(hc.last_duration_ms)}` : "";
    last = (hc.last_error ? `failed: ${hc.last_error}` : `HTTP ${hc.last_status}${took}`) + `, ${fmtAgo(hc.last_check)}`;
  }
  let progress;
  if (hc.health === "up") {
    progress = `failures ${hc.consecutive_failures}/${hc.fall} to down`;
  } else {
    progress = `passes ${hc.consecutive_passes}/${hc.rise} to up`;
  }
  if (hc.ejected) progress += " · ejected by outlier detection";
  if (hc.slow_start_percent !== null && hc.slow_start_percent !== undefined) {
    progress += ` · slow start ${hc.slow_start_percent} %`;
  }
  return { text: last, detail: progress, bad: Boolean(hc.last_error) || (hc.last_status ?? 200) >= 400 };
}

function renderBackend(entry, b) {
  const c = entry.cells;
  if (!c.id.firstChild) {
    c.id.append(el("span", b.id, "id"), el("br"), el("span", b.address, "small"));
  }
  setText(c.state, b.state + (b.removing ? " (removing)" : "") + (b.ejected ? " (ejected)" : ""));
  c.state.className = "state state-" + b.state;
  const h = healthText(b);
  c.health.replaceChildren(el("span", h.text, h.bad ? "health-error" : ""), el("br"), el("span", h.detail, "small"));
  const t = b.traffic || {};
  setText(c.inflight, b.in_flight);
  setText(c.rps, fmtRate(t.requests_per_second));
  setText(c.errors, fmtPercent(t.error_rate));
  setText(c.requests, b.requests);
  setText(c.weight, b.effective_weight !== b.weight ? `${b.effective_weight}/${b.weight}` : b.weight);
  const busy = b.removing || view.readOnly;
  entry.buttons.drain.disabled = busy || b.admin === "draining" || b.admin === "drained";
  entry.buttons.disable.disabled = busy || b.admin === "disabled";
  entry.buttons.enable.disabled = busy || b.admin === "enabled";
}

function renderPools(state) {
  const root = $("pools");
  const names = Object.keys(state.pools);
  for (const [name, entry] of view.pools) {
    if (!names.includes(name)) {
      entry.card.remove();
      view.pools.delete(name);
    }
  }
  for (const name of names) {
    const pool = state.pools[name];
    let entry = view.pools.get(name);
    if (!entry) {
      entry = poolCard(name);
      view.pools.set(name, entry);
    }
    root.append(entry.card); // keeps the API's order
    setText(entry.weight, `${pool.weight} %`);
    const t = pool.traffic || {};
    setText(entry.fig.rps, fmtRate(t.requests_per_second));
    setText(entry.fig.errors, fmtPercent(t.error_rate));
    setText(entry.fig.p50, fmtMs(t.p50_ms));
    setText(entry.fig.p99, fmtMs(t.p99_ms));
    setText(entry.fig.inflight, pool.backends.reduce((n, b) => n + b.in_flight, 0));
    setText(entry.fig.usable, pool.usable ? "" : "no backend takes traffic");
    entry.flip.disabled = view.readOnly || pool.weight === 100;
    const ids = new Set(pool.backends.map((b) => b.id));
    for (const [id, row] of entry.rows) {
      if (!ids.has(id)) {
        row.row.remove();
        entry.rows.delete(id);
      }
    }
    for (const b of pool.backends) {
      let row = entry.rows.get(b.id);
      if (!row) {
        row = backendRow(b);
        entry.rows.set(b.id, row);
      }
      entry.tbody.append(row.row);
      renderBackend(row, b);
    }
  }
}

// ---- rollout -----------------------------------------------------------------

function sampleText(s) {
  if (!s) return "–";
  return `${s.requests} req, errors ${fmtPercent(s.error_rate)}, p99 ${fmtMs(s.p99_ms)}`;
}

function renderRollout(r) {
  const body = $("rollout-body");
  if (!r) {
    body.replaceChildren(el("p", "No rollout yet. Start one with zdproxy ctl rollout start.", "hint"));
    return;
  }
  const nodes = [];
  const head = el("p");
  const phase = el("span", r.phase, "state phase phase-" + r.phase);
  head.append(
    el("b", `Rollout #${r.id}: ${r.from} → ${r.to} `),
    phase,
    document.createTextNode(` · step ${r.step} of ${r.steps} · by ${r.actor} · started ${fmtTime(r.started_at)}`),
  );
  nodes.push(head);
  const steps = el("ol");
  steps.id = "steps";
  const plan = (r.plan && r.plan.steps) || [];
  plan.forEach((s, i) => {
    const index = i + 1;
    const pause = s.pause === undefined || s.pause === null ? "waits for promote" : `hold ${fmtDuration(s.pause)}`;
    const item = el("li", `${index}. ${s.weight} % · ${pause}`);
    if (index < r.step || (index === r.step && !r.active && r.phase === "succeeded")) item.className = "done";
    else if (index === r.step && r.active) item.className = "current";
    steps.append(item);
  });
  nodes.push(steps);
  const facts = [];
  if (r.waiting) facts.push(`waiting: ${r.waiting}`);
  if (r.step_pause_remaining !== null && r.step_pause_remaining !== undefined) {
    facts.push(`step holds ${r.step_pause_remaining.toFixed(0)} s more`);
  }
  if (r.reason) facts.push(`reason: ${r.reason}`);
  if (r.weights) facts.push("weights: " + Object.entries(r.weights).map(([k, v]) => `${k} ${v} %`).join(", "));
  for (const f of facts) nodes.push(el("p", f, "small"));
  const actions = el("div", null, "rollout-actions");
  const buttons = [
    ["pause", r.phase === "progressing"],
    ["resume", r.phase === "paused"],
    ["promote", r.active],
    ["abort", r.active],
  ];
  for (const [verb, enabled] of buttons) {
    const button = el("button", verb, "mutate rollout-" + verb);
    button.type = "button";
    button.disabled = !enabled || view.readOnly;
    button.addEventListener("click", () => rolloutAction(verb));
    actions.append(button);
  }
  nodes.push(actions);
  const kpis = Object.entries(r.kpis || {});
  if (kpis.length) {
    const dl = el("dl", null, "kpis");
    for (const [k, v] of kpis) dl.append(el("dt", k), el("dd", typeof v === "object" ? brief(v) : v));
    nodes.push(dl);
  }
  const verdicts = (r.verdicts || []).slice(-10).reverse();
  if (verdicts.length) {
    const table = el("table", null, "verdicts");
    const headRow = el("tr");
    for (const h of ["#", "time", "step", "weight", "verdict", "why", "canary", "baseline"]) headRow.append(el("th", h));
    table.append(headRow);
    for (const v of verdicts) {
      const row = el("tr");
      row.append(
        el("td", v.n), el("td", fmtTime(v.time)), el("td", v.step), el("td", `${v.weight} %`),
        el("td", v.result, "state result-" + v.result), el("td", v.reason),
        el("td", sampleText(v.canary)), el("td", sampleText(v.baseline)),
      );
      table.append(row);
    }
    nodes.push(el("h3", "Verdicts (newest first)"), table);
  }
  body.replaceChildren(...nodes);
}

async function rolloutAction(verb) {
  if (verb === "abort" && !window.confirm("Abort the rollout? All traffic goes back to the replaced pool.")) {
    return;
  }
  if (verb === "promote" && !window.confirm("Promote: skip the analysis of this step and go to the next one?")) {
    return;
  }
  await act("POST", `${base()}/rollouts/current/${verb}`, undefined, `Rollout: ${verb}`);
}

// ---- events ------------------------------------------------------------------

/** A short human summary of an event's before/after value. */
function brief(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) return value.map(brief).join(", ");
  if (typeof value !== "object") return String(value);
  if ("state" in value && "pool" in value) return value.state + (value.removing ? " (removing)" : "");
  if ("result" in value && "reason" in value) return `${value.result}: ${value.reason}`;
  if ("phase" in value) {
    return [value.phase, value.step !== undefined ? `step ${value.step}` : null,
            value.weight !== undefined ? `${value.weight} %` : null].filter(Boolean).join(", ");
  }
  return Object.entries(value)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? `[${v.length}]` : v !== null && typeof v === "object" ? "{…}" : v}`)
    .join(" ");
}

function renderEvents(events) {
  const body = $("events").querySelector("tbody");
  const rows = [];
  for (const e of events.slice().reverse()) {
    const row = el("tr");
    row.dataset.event = e.id;
    const time = el("td", fmtTime(e.time));
    time.title = e.time;
    let change = `${brief(e.before)} → ${brief(e.after)}`;
    if (e.note) change += ` (${e.note})`;
    const cell = el("td", change.length > 200 ? change.slice(0, 200) + "…" : change, "change");
    cell.title = JSON.stringify({ before: e.before, after: e.after });
    row.append(time, el("td", e.actor), el("td", e.action, "action"), el("td", e.target), cell);
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

// ---- wiring ------------------------------------------------------------------

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(KEY, token);
  $("token").value = "";
  showError("");
  refresh();
});
$("logout").addEventListener("click", () => signOut(""));
$("service").addEventListener("change", chooseService);
$("split").addEventListener("submit", applySplit);
$("split-reset").addEventListener("click", () => {
  view.splitDirty = false;
  if (view.state) renderSplit(view.state);
});
$("split-range").addEventListener("input", () => {
  const inputs = splitInputs();
  if (inputs.length !== 2) return;
  inputs[1].value = $("split-range").value;
  inputs[0].value = 100 - Number($("split-range").value);
  view.splitDirty = true;
  updateSplitSum();
});

refresh();
