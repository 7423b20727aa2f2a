// zdproxy dashboard placeholder: asks for the admin token, then shows the state
// and recent changes, refreshed every second. Flip and backend buttons call the API.
"use strict";

const KEY = "zdproxy-admin-token";
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem(KEY);
    showLogin(data.error || "authentication failed");
    throw new Error(data.error);
  }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  showError(message);
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

async function act(method, path, body) {
  try {
    await api(method, path, body);
    showError("");
    await refresh();
  } catch (e) {
    showError(e.message);
  }
}

function renderState(state) {
  $("meta").textContent = `version ${state.version}, pid ${state.pid}`;
  const root = $("pools");
  root.replaceChildren();
  for (const [name, pool] of Object.entries(state.pools)) {
    const section = el("div", null, "pool");
    const title = el("h2", `${name} ${pool.weight} %`);
    section.append(title);
    const flip = el("button", `Flip to ${name}`);
    flip.disabled = pool.weight === 100;
    flip.onclick = () => act("POST", "/api/v1/flip", { to: name });
    section.append(flip);
    const table = el("table");
    const head = el("tr");
    for (const h of ["backend", "address", "state", "in flight", "weight", ""]) head.append(el("th", h));
    table.append(head);
    for (const b of pool.backends) {
      const row = el("tr");
      row.append(el("td", b.id), el("td", b.address), el("td", b.state, "state-" + b.state),
                 el("td", b.in_flight), el("td", b.effective_weight));
      const actions = el("td");
      for (const verb of ["drain", "disable", "enable"]) {
        const button = el("button", verb);
        button.onclick = () => act("POST", `/api/v1/backends/${encodeURIComponent(b.id)}/${verb}`);
        actions.append(button);
      }
      row.append(actions);
      table.append(row);
    }
    section.append(table);
    root.append(section);
  }
}

function renderEvents(events) {
  const body = $("events").querySelector("tbody");
  body.replaceChildren();
  for (const e of events.slice().reverse()) {
    const row = el("tr");
    row.append(el("td", e.time), el("td", e.actor), el("td", e.action), el("td", e.target),
               el("td", JSON.stringify(e.after)));
    body.append(row);
  }
}

async function refresh() {
  if (!sessionStorage.getItem(KEY)) return showLogin("");
  try {
    const [state, events] = await Promise.all([
      api("GET", "/api/v1/state"),
      api("GET", "/api/v1/events?limit=20"),
    ]);
    $("login").hidden = true;
    $("main").hidden = false;
    renderState(state);
    renderEvents(events.events);
  } catch (e) {
    showError(e.message);
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("token").value.trim());
  $("token").value = "";
  refresh();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  showLogin("");
});

refresh();
setInterval(refresh, 1000);
