// The eretes dashboard. Plain JavaScript, no dependencies: it reads the
// agent's API (/v1/...) with the token the user typed (kept in this tab's
// session storage, sent as a bearer token, never put in a URL), follows the
// agent's change stream (/v1/events) to re-read only the rows it shows, and
// draws every value with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "eretes.token";
const PAGE = 100;
const STATES = ["pending", "running", "sleeping", "paused", "fault", "done", "failed", "killed"];
const SAMPLE_EVERY_MS = 2000;
const SAMPLES_KEPT = 150; // five minutes
const RETRY_MS = 2000;

// ---------------------------------------------------------------- helpers

/** An element with attributes (on* as listeners) and children. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}`, "data-state": state, text: state });
}

function ago(ms) {
  if (!ms) return "—";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "—";
}

function command(properties) {
  if (!properties || typeof properties !== "object") return "";
  const kube = properties.kubernetes;
  if (kube && typeof kube === "object") {
    // A Kubernetes task: its image, then the container's command and args.
    const words = [kube.command, kube.args]
      .flatMap((list) => (Array.isArray(list) ? list : []))
      .filter((w) => typeof w === "string");
    return ["[" + String(kube.image) + "]", ...words].join(" ");
  }
  const spec = properties.process && typeof properties.process === "object" ? properties.process : properties;
  // Whatever a library submitted: only strings are words of a command.
  const args = Array.isArray(spec.args) ? spec.args : [];
  const words = [spec.program, ...args].filter((w) => typeof w === "string");
  return words.length ? words.join(" ") : JSON.stringify(properties);
}

function notice(text, kind) {
  const box = document.getElementById("notice");
  box.textContent = text || "";
  box.className = kind || "";
  box.hidden = !text;
}

// ------------------------------------------------------------------- API

/** An answer the API refused, with its code and message. */
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(method, path, body) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    if (response.status === 401) askForToken();
    throw new ApiError(response.status, error.code || "error", error.message || `${response.status} ${response.statusText}`);
  }
  return data;
}

/** Run an action; say on the page what happened. */
async function act(what, call) {
  try {
    await call();
    notice(`${what}: sent`, "info");
    return true;
  } catch (error) {
    notice(`${what} refused: ${error.message}`);
    return false;
  }
}

function askForToken() {
  const form = document.getElementById("token-form");
  form.hidden = false;
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  sessionStorage.setItem(TOKEN_KEY, input.value);
  input.value = "";
  document.getElementById("token-form").hidden = true;
  notice("");
  changes.restart();
  render();
});

// ------------------------------------------------------ the change stream

/** Follows GET /v1/events (with fetch: EventSource cannot send a token). */
const changes = {
  controller: null,
  listeners: new Set(),

  restart() {
    this.stop();
    this.controller = new AbortController();
    this.follow(this.controller.signal);
  },

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  },

  status(ok, text) {
    const live = document.getElementById("live");
    live.textContent = text;
    live.className = `live ${ok ? "ok" : "down"}`;
  },

  async follow(signal) {
    while (!signal.aborted) {
      try {
        const response = await fetch("/v1/events", { headers: authHeaders(), signal });
        if (response.status === 401) {
          this.status(false, "needs a token");
          askForToken();
          return;
        }
        if (!response.ok) throw new Error(`${response.status}`);
        this.status(true, "live");
        // The stream may have missed changes while it was down.
        this.emit({ all: true });
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          // Lines may end in \r\n (the SSE format allows it).
          buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            this.dispatch(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
        }
      } catch (error) {
        if (signal.aborted) return;
      }
      this.status(false, "reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  },

  dispatch(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (event !== "change" || !data.length) return;
    try {
      this.emit(JSON.parse(data.join("\n")));
    } catch (_) {
      // A malformed event is skipped; the next one carries on.
    }
  },

  emit(change) {
    for (const listener of this.listeners) listener(change);
  },
};

// ---------------------------------------------- cluster figures over time

/** Samples GET /v1/summary every few seconds for the cluster view's charts. */
const sampler = {
  samples: [],
  latest: null,

  async sample() {
    try {
      const summary = await api("GET", "/v1/summary");
      this.latest = summary;
      this.samples.push({ at: summary.at_ms, counters: summary.counters, states: summary.states });
      if (this.samples.length > SAMPLES_KEPT) this.samples.shift();
      if (current && current.onSample) current.onSample(summary);
    } catch (_) {
      // Shown by the views that need it; the sampler tries again.
    }
  },

  /** Per-second rates of one counter between consecutive samples. */
  rates(counter) {
    const out = [];
    for (let i = 1; i < this.samples.length; i++) {
      const a = this.samples[i - 1];
      const b = this.samples[i];
      const seconds = (b.at - a.at) / 1000;
      if (seconds <= 0) continue;
      out.push(Math.max(0, (b.counters[counter] - a.counters[counter]) / seconds));
    }
    return out;
  },
};

function chart(title, values, id) {
  const width = 300;
  const height = 80;
  // One sample is drawn as a flat line, not as nothing.
  if (values.length === 1) values = [values[0], values[0]];
  const top = Math.max(1, ...values);
  const step = values.length > 1 ? width / (SAMPLES_KEPT - 1) : 0;
  const start = width - step * (values.length - 1);
  const points = values
    .map((v, i) => `${(start + i * step).toFixed(1)},${(height - (v / top) * (height - 4) - 2).toFixed(1)}`)
    .join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title} over the last five minutes`);
  svg.setAttribute("preserveAspectRatio", "none");
  const baseline = document.createElementNS("http://www.w3.org/2000/svg", "line");
  for (const [name, value] of [["x1", 0], ["y1", height - 1], ["x2", width], ["y2", height - 1]]) baseline.setAttribute(name, value);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(baseline, line);
  const last = values.length ? values[values.length - 1] : 0;
  return el(
    "div",
    { class: "chart", id },
    el("div", {}, el("strong", { text: title }), " ", el("span", { class: "muted", text: `now ${last.toFixed(1)}/s, peak ${Math.max(0, ...values).toFixed(1)}/s` })),
    svg,
  );
}

// ----------------------------------------------------------------- views

let current = null;

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/tasks";
  const [path, query] = hash.split("?");
  return { path, params: new URLSearchParams(query || "") };
}

/** The task list: one page at a time, re-read when the stream names a row
 *  of it (or a task that would fall inside it). */
function tasksView(params) {
  const filters = {
    state: params.get("state") || "",
    group: params.get("group") || "",
  };
  const cursors = [""]; // the `after` of each page seen
  let page = { tasks: [], next: null };
  let reload = null;

  const tbody = el("tbody");
  const status = el("span", { class: "muted", id: "page-status" });
  const prev = el("button", { type: "button", id: "page-prev", disabled: true, onclick: () => { if (cursors.length > 1 && !prev.disabled) { cursors.pop(); load(); } } }, "← Previous");
  const next = el("button", { type: "button", id: "page-next", disabled: true, onclick: () => { if (page.next && !next.disabled) { cursors.push(page.next); load(); } } }, "Next →");

  const stateSelect = el("select", { id: "filter-state", onchange: () => applyFilters() },
    el("option", { value: "", text: "every state" }),
    STATES.map((s) => el("option", { value: s, selected: s === filters.state, text: s })));
  const groupInput = el("input", { id: "filter-group", value: filters.group, placeholder: "every group", onchange: () => applyFilters() });
  const searchInput = el("input", { id: "search-id", placeholder: "task id" });
  const searchForm = el("form", { class: "controls", onsubmit: (event) => { event.preventDefault(); search(); } },
    el("label", {}, "State", stateSelect),
    el("label", {}, "Group", groupInput),
    el("label", {}, "Find a task by id", searchInput),
    el("button", { type: "submit", id: "search-go" }, "Open"));

  function applyFilters() {
    const query = new URLSearchParams();
    if (stateSelect.value) query.set("state", stateSelect.value);
    if (groupInput.value.trim()) query.set("group", groupInput.value.trim());
    location.hash = `#/tasks${query.toString() ? `?${query}` : ""}`;
  }

  async function search() {
    const id = searchInput.value.trim();
    if (!id) return;
    try {
      await api("GET", `/v1/tasks/${encodeURIComponent(id)}`);
      location.hash = `#/task/${encodeURIComponent(id)}`;
    } catch (error) {
      notice(`${id}: ${error.message}`);
    }
  }

  let loads = 0;

  /** Read the page at the last cursor. A move to another page
   *  (`navigating`) holds the buttons until it lands, so a second click
   *  cannot push the same cursor twice; a refresh the stream asked for
   *  leaves them as they are, so a click during it is not lost. */
  async function load(navigating = true) {
    const mine = ++loads;
    if (navigating) {
      prev.disabled = true;
      next.disabled = true;
    }
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (filters.state) query.set("state", filters.state);
    if (filters.group) query.set("group", filters.group);
    const after = cursors[cursors.length - 1];
    if (after) query.set("after", after);
    let answer;
    try {
      answer = await api("GET", `/v1/tasks?${query}`);
    } catch (error) {
      if (mine === loads) {
        status.textContent = `cannot list tasks: ${error.message}`;
        prev.disabled = cursors.length <= 1;
      }
      return;
    }
    // A later load (a click, a change) was sent since: its answer counts.
    if (mine !== loads) return;
    page = answer;
    const rows = page.tasks.map((task) =>
      el("tr", { "data-id": task.id },
        el("td", { class: "id" }, el("a", { href: `#/task/${encodeURIComponent(task.id)}`, text: task.id })),
        el("td", { class: "state" }, stateBadge(task.state)),
        el("td", { text: task.group }),
        el("td", { class: "node", text: task.node || "—" }),
        el("td", { text: task.epoch ?? "—" }),
        el("td", { text: ago(task.submitted_at_ms) }),
        el("td", { class: "command", text: command(task.properties) })));
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: "7", class: "muted", text: "no tasks" })));
    status.textContent = `page ${cursors.length}, ${page.tasks.length} task${page.tasks.length === 1 ? "" : "s"}`;
    prev.disabled = cursors.length <= 1;
    next.disabled = !page.next;
  }

  /** Whether a change to these tasks can alter the page shown. */
  function touches(change) {
    if (change.all) return true;
    const after = cursors[cursors.length - 1];
    const last = page.tasks.length ? page.tasks[page.tasks.length - 1].id : null;
    return change.ids.some((id) =>
      page.tasks.some((task) => task.id === id) ||
      ((!after || id > after) && (!page.next || (last !== null && id <= last))));
  }

  const root = el("section", { "aria-labelledby": "tasks-title" },
    el("h2", { id: "tasks-title", text: "Tasks" }),
    searchForm,
    el("table", { id: "tasks" },
      el("thead", {}, el("tr", {}, ["id", "state", "group", "node", "epoch", "age", "command"].map((h) => el("th", { scope: "col", text: h })))),
      tbody),
    el("div", { class: "pager" }, prev, next, status));

  return {
    root,
    start: () => load(),
    onChange(change) {
      if (!touches(change) || reload) return;
      reload = setTimeout(() => { reload = null; load(false); }, 100);
    },
    stop() { clearTimeout(reload); },
  };
}

/** One task: its facts, runs, actions and the tail of its log. */
function taskView(id) {
  const facts = el("dl", { class: "facts", id: "task-facts" });
  const runsBody = el("tbody");
  const runFacts = el("p", { class: "muted", id: "run-facts" });
  const errors = el("ul", { id: "task-errors" });
  const log = el("pre", { class: "log", id: "task-log", "aria-live": "off" });
  const logStatus = el("span", { class: "muted", id: "log-status" });
  const streamSelect = el("select", { id: "log-stream", onchange: () => followLog() },
    el("option", { value: "stdout", text: "stdout" }), el("option", { value: "stderr", text: "stderr" }));
  const sleepInput = el("input", { id: "sleep-seconds", type: "number", min: "1", value: "60", size: "6", "aria-label": "seconds to sleep" });
  let logController = null;
  let reload = null;
  const path = `/v1/tasks/${encodeURIComponent(id)}`;

  function send(body, what) {
    return act(`${what} ${id}`, () => api("POST", `${path}/commands`, body)).then(() => load());
  }

  let removeArmed = false;
  let removing = false;
  const removeButton = el("button", { type: "button", class: "danger", id: "action-remove", onclick: async () => {
    if (!removeArmed) {
      removeArmed = true;
      removeButton.textContent = "Really remove?";
      // Disarmed again unless confirmed soon.
      setTimeout(() => { removeArmed = false; removeButton.textContent = "Remove"; }, 5000);
      return;
    }
    // Its page is not read again while it goes (that read would be a 404).
    removing = true;
    clearTimeout(reload);
    reload = null;
    if (await act(`remove ${id}`, () => api("DELETE", path))) {
      location.hash = "#/tasks";
      // After the navigation, which clears notices.
      setTimeout(() => notice(`removed ${id}`, "info"), 0);
    } else {
      removing = false;
    }
  } }, "Remove");

  const actions = el("div", { class: "actions" },
    el("button", { type: "button", id: "action-pause", onclick: () => send({ command: "pause" }, "pause") }, "Pause"),
    el("button", { type: "button", id: "action-resume", onclick: () => send({ command: "resume" }, "resume") }, "Resume"),
    el("span", {}, sleepInput, " s ",
      el("button", { type: "button", id: "action-sleep", onclick: () => {
        const seconds = Number(sleepInput.value);
        if (!Number.isFinite(seconds) || seconds <= 0) { notice("sleep: give a positive number of seconds"); return; }
        send({ command: "sleep", duration_ms: Math.round(seconds * 1000) }, "sleep");
      } }, "Sleep")),
    el("button", { type: "button", class: "danger", id: "action-kill", onclick: () => send({ command: "kill" }, "kill") }, "Kill"),
    removeButton);

  let loads = 0;

  async function load() {
    const mine = ++loads;
    let task;
    try {
      task = await api("GET", path);
      if (mine !== loads) return;
    } catch (error) {
      if (mine !== loads) return;
      facts.replaceChildren(el("dt", { text: "error" }), el("dd", { text: error.message }));
      return;
    }
    const rows = [
      ["state", stateBadge(task.state)],
      ["group", task.group],
      ["node", task.node || "—"],
      ["epoch", task.epoch ?? "—"],
      ["submitted", task.submitted_at_ms ? `${when(task.submitted_at_ms)} (${ago(task.submitted_at_ms)} ago)` : "—"],
      ["ended", task.finished_at_ms ? when(task.finished_at_ms) : "—"],
      ["command", el("span", { class: "mono", text: command(task.properties) })],
    ];
    if (task.sleeping_until_ms) rows.push(["sleeps until", when(task.sleeping_until_ms)]);
    if (task.result !== undefined) rows.push(["result", el("span", { class: "mono", text: JSON.stringify(task.result) })]);
    if (task.error) rows.push(["error", task.error]);
    facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { "data-fact": k }, v)]));
    errors.replaceChildren(...(task.errors || []).map((e) => el("li", { text: `${when(e.at_ms)}: ${e.message}` })));
    if (!(task.errors || []).length) errors.append(el("li", { class: "muted", text: "none" }));
    try {
      const runs = await api("GET", `${path}/runs`);
      if (mine !== loads) return;
      runsBody.replaceChildren(...runs.runs.map((run) =>
        el("tr", {}, el("td", { text: run.kind }), el("td", { text: run.node }), el("td", { text: run.epoch }), el("td", { text: when(run.at_ms) }))));
      if (!runs.runs.length) runsBody.append(el("tr", {}, el("td", { colspan: "4", class: "muted", text: "no run seen by this agent" })));
      const checkpoint = runs.checkpoint ? `${runs.checkpoint.bytes} bytes (revision ${runs.checkpoint.revision})` : "none";
      runFacts.textContent = `attempts ${runs.claims ?? "—"}, takeovers ${runs.takeovers ?? "—"}, checkpoint ${checkpoint}`;
    } catch (error) {
      runFacts.textContent = `runs: ${error.message}`;
    }
  }

  async function followLog() {
    if (logController) logController.abort();
    logController = new AbortController();
    const signal = logController.signal;
    log.textContent = "";
    logStatus.textContent = "following…";
    try {
      const response = await fetch(`${path}/logs?stream=${streamSelect.value}&tail=200&follow=true`, { headers: authHeaders(), signal });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        logStatus.textContent = `log: ${(data.error && data.error.message) || response.status}`;
        if (response.status === 401) askForToken();
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        // Another stream was chosen, or the view left, while this read waited.
        if (signal.aborted) return;
        if (done) break;
        const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.append(decoder.decode(value, { stream: true }));
        // Keep at most the last 200 KB on the page.
        if (log.textContent.length > 200000) log.textContent = log.textContent.slice(-150000);
        if (atBottom) log.scrollTop = log.scrollHeight;
      }
      logStatus.textContent = "the task has ended; this is all of its log here";
    } catch (error) {
      if (!signal.aborted) logStatus.textContent = `log: ${error.message}`;
    }
  }

  const root = el("section", { "aria-labelledby": "task-title" },
    el("h2", { id: "task-title" }, "Task ", el("span", { class: "mono", text: id })),
    facts,
    actions,
    el("h2", { text: "Runs" }),
    runFacts,
    el("table", { id: "task-runs" },
      el("thead", {}, el("tr", {}, ["what", "node", "epoch", "when"].map((h) => el("th", { scope: "col", text: h })))),
      runsBody),
    el("h2", { text: "Recent errors" }),
    errors,
    el("h2", {}, "Log ", streamSelect, " ", logStatus),
    log);

  return {
    root,
    start() { load(); followLog(); },
    onChange(change) {
      if (removing || reload || !(change.all || change.ids.includes(id))) return;
      reload = setTimeout(() => { reload = null; load(); }, 100);
    },
    stop() {
      clearTimeout(reload);
      if (logController) logController.abort();
    },
  };
}

/** Live nodes, with commands. */
function nodesView() {
  const tbody = el("tbody");
  const status = el("p", { class: "muted", id: "nodes-status" });
  let reload = null;

  function nodeCommand(name, what) {
    return act(`${what} ${name}`, () => api("POST", `/v1/nodes/${encodeURIComponent(name)}/commands`, { command: what })).then(() => load());
  }

  async function load() {
    let nodes;
    try {
      nodes = (await api("GET", "/v1/nodes")).nodes;
    } catch (error) {
      status.textContent = `cannot list nodes: ${error.message}`;
      return;
    }
    const own = sampler.latest;
    tbody.replaceChildren(...nodes.map((node) => {
      const here = own && own.node === node.name;
      return el("tr", { "data-node": node.name },
        el("td", { class: "mono", text: node.name + (here ? " (this agent)" : "") }),
        el("td", { class: "groups", text: node.groups.map((g) => `${g} (${(node.running_by_group || {})[g] || 0} running)`).join(", ") }),
        el("td", { class: "running", text: node.running + (node.max_running ? ` / ${node.max_running}` : "") }),
        el("td", { class: "frozen", text: here ? (own.frozen ? "frozen" : "claiming") : "—" }),
        el("td", { class: "lease", text: here && own.lease_renewal_ms != null ? `${own.lease_renewal_ms.toFixed(1)} ms, ${Math.round(own.lease_renewed_ms_ago / 1000)} s ago` : "—" }),
        el("td", { text: ago(node.started_at_ms) }),
        el("td", { class: "node-actions" },
          ["freeze", "unfreeze", "balance", "drain"].map((what) =>
            el("button", { type: "button", "data-command": what, class: what === "drain" ? "danger" : null, onclick: () => nodeCommand(node.name, what) }, what))));
    }));
    status.textContent = `${nodes.length} live node${nodes.length === 1 ? "" : "s"}`;
  }

  const root = el("section", { "aria-labelledby": "nodes-title" },
    el("h2", { id: "nodes-title", text: "Nodes" }),
    status,
    el("table", { id: "nodes" },
      el("thead", {}, el("tr", {}, ["node", "groups", "running", "status", "lease renewal", "up", "commands"].map((h) => el("th", { scope: "col", text: h })))),
      tbody),
    el("p", { class: "muted", text: "Frozen and lease renewal are known for this agent's own node; drain freezes the node and hands its tasks to the others." }));

  return {
    root,
    start: load,
    onChange(change) {
      if (reload) return;
      reload = setTimeout(() => { reload = null; load(); }, 500);
    },
    onSample: () => load(),
    stop() { clearTimeout(reload); },
  };
}

/** Counts by state and rates over the last minutes. */
function clusterView() {
  const body = el("div", { id: "cluster" });

  function draw() {
    const summary = sampler.latest;
    if (!summary) {
      body.replaceChildren(el("p", { class: "muted", text: "reading the agent's figures…" }));
      return;
    }
    const cards = el("div", { class: "cards", id: "state-counts" },
      STATES.map((s) => el("div", { class: "card", "data-state": s }, el("div", { class: "n", text: summary.states[s] ?? 0 }), el("div", { class: "k" }, stateBadge(s)))));
    const groups = el("table", { id: "group-counts" },
      el("thead", {}, el("tr", {}, el("th", { text: "group" }), STATES.map((s) => el("th", { text: s })))),
      el("tbody", {}, Object.entries(summary.groups).map(([group, counts]) =>
        el("tr", {}, el("td", { text: group }), STATES.map((s) => el("td", { text: counts[s] ?? 0 }))))));
    body.replaceChildren(
      el("h2", { text: "Tasks by state" }), cards,
      el("h2", { text: `This agent's node (${summary.node}), last five minutes` }),
      chart("claims", sampler.rates("claims"), "chart-claims"),
      chart("failovers", sampler.rates("takeovers"), "chart-failovers"),
      chart("completions", sampler.rates("completions"), "chart-completions"),
      el("h2", { text: "Tasks by group" }), groups);
  }

  return {
    root: el("section", { "aria-label": "Cluster" }, body),
    start: draw,
    onChange() {},
    onSample: draw,
    stop() {},
  };
}

const STATE_FILL = {
  pending: "#fff4d6", running: "#dcf5e3", sleeping: "#e8eefc", paused: "#e8eefc",
  fault: "#fde4e1", done: "#e6e6e6", failed: "#fde4e1", killed: "#fde4e1",
};
const MAX_DRAWN = 2000;

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

/** A stable colour per node name. */
function nodeColour(name) {
  let hash = 0;
  for (const c of name || "") hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return name ? `hsl(${hash % 360}, 65%, 38%)` : "#9aa3ad";
}

/** The task graphs of the namespace. */
function graphsView() {
  const tbody = el("tbody");
  const status = el("p", { class: "muted", id: "graphs-status" });

  async function load() {
    let list;
    try {
      list = await api("GET", "/v1/jobs");
    } catch (error) {
      status.textContent = `cannot list jobs: ${error.message}`;
      return;
    }
    tbody.replaceChildren(...list.jobs.map((job) =>
      el("tr", { "data-job": job.name },
        el("td", { class: "id" }, el("a", { href: `#/graph/${encodeURIComponent(job.name)}`, text: job.name })),
        el("td", { text: job.spec.kind }),
        el("td", { text: job.spec.tasks }),
        el("td", { text: job.spec.group }),
        el("td", { text: job.epoch ? `${job.epoch.epoch}${job.epoch.shutdown ? " (shut down)" : ""}` : "—" }))));
    status.textContent = list.jobs.length ? `${list.jobs.length} job${list.jobs.length === 1 ? "" : "s"}` : "no task graphs in this namespace";
  }

  return {
    root: el("section", { "aria-labelledby": "graphs-title" },
      el("h2", { id: "graphs-title", text: "Task graphs" }),
      status,
      el("table", { id: "jobs" },
        el("thead", {}, el("tr", {}, ["job", "kind", "tasks", "group", "epoch"].map((h) => el("th", { scope: "col", text: h })))),
        tbody)),
    start: load,
    onChange() {},
    stop() {},
  };
}

/** One job's topology: tasks in layers from task 0, filled by state,
 *  outlined in their node's colour. */
function graphView(name) {
  const body = el("div", { id: "graph" });
  let reload = null;

  async function load() {
    let job;
    try {
      job = await api("GET", `/v1/jobs/${encodeURIComponent(name)}`);
    } catch (error) {
      body.replaceChildren(el("p", { text: `${name}: ${error.message}` }));
      return;
    }
    const tasks = job.tasks.slice(0, MAX_DRAWN);
    const neighbours = new Map(tasks.map((t) => [t.index, []]));
    for (const edge of job.edges) {
      if (neighbours.has(edge.from) && neighbours.has(edge.to)) {
        neighbours.get(edge.from).push(edge.to);
        neighbours.get(edge.to).push(edge.from);
      }
    }
    // Layers by distance from task 0; tasks it does not reach go last.
    const depth = new Map([[0, 0]]);
    const queue = neighbours.has(0) ? [0] : [];
    while (queue.length) {
      const task = queue.shift();
      for (const next of neighbours.get(task)) {
        if (!depth.has(next)) { depth.set(next, depth.get(task) + 1); queue.push(next); }
      }
    }
    const deepest = Math.max(0, ...depth.values());
    const layers = [];
    for (const t of tasks) {
      const d = depth.has(t.index) ? depth.get(t.index) : deepest + 1;
      (layers[d] = layers[d] || []).push(t);
    }
    const width = Math.max(600, ...layers.map((l) => (l ? l.length * 56 : 0)));
    const height = layers.length * 80 + 20;
    const at = new Map();
    layers.forEach((layer, d) => (layer || []).forEach((t, i) =>
      at.set(t.index, { x: ((i + 0.5) * width) / layer.length, y: 40 + d * 80 })));
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `topology of ${name}`, class: "topology" });
    for (const edge of job.edges) {
      const a = at.get(edge.from);
      const b = at.get(edge.to);
      if (a && b) svg.append(svgEl("line", { class: "graph-edge", x1: a.x, y1: a.y, x2: b.x, y2: b.y, "data-link": edge.link }));
    }
    for (const t of tasks) {
      const p = at.get(t.index);
      const state = t.state || "unknown";
      const group = svgEl("g", { class: "graph-task", "data-index": t.index, "data-state": state, "data-node": t.node || "" });
      const title = svgEl("title", {});
      title.textContent = `${t.id}: ${state}${t.node ? ` on ${t.node}` : ""}`;
      group.append(title,
        svgEl("circle", { cx: p.x, cy: p.y, r: 18, fill: STATE_FILL[state] || "#fff", stroke: nodeColour(t.node), "stroke-width": 3 }));
      const label = svgEl("text", { x: p.x, y: p.y + 4, "text-anchor": "middle" });
      label.textContent = t.index;
      group.append(label);
      group.addEventListener("click", () => { location.hash = `#/task/${encodeURIComponent(t.id)}`; });
      svg.append(group);
    }
    const nodes = [...new Set(tasks.map((t) => t.node).filter(Boolean))].sort();
    body.replaceChildren(
      el("p", { class: "muted", id: "graph-facts", text: `${job.kind}, ${job.tasks.length} tasks, ${job.edges.length} links, epoch ${job.epoch ? job.epoch.epoch : "—"}${job.topology_known ? "" : " (this agent does not know the kind's topology)"}${job.tasks.length > MAX_DRAWN ? `; the first ${MAX_DRAWN} tasks drawn` : ""}` }),
      el("p", { class: "legend" }, "Fill: the task's state. Outline: its node — ",
        nodes.length ? nodes.map((n) => el("span", { class: "node-key", style: null }, el("span", { class: "swatch", "data-node": n }), n, " ")) : "none runs"),
      svg);
    for (const swatch of body.querySelectorAll(".swatch")) swatch.style.background = nodeColour(swatch.dataset.node);
  }

  return {
    root: el("section", { "aria-labelledby": "graph-title" },
      el("h2", { id: "graph-title" }, "Task graph ", el("span", { class: "mono", text: name })),
      body),
    start: load,
    onChange(change) {
      const mine = change.all || change.ids.some((id) => id.startsWith(`${name}.`));
      if (!mine || reload) return;
      // A graph is redrawn at most every 2 s, however busy its job.
      reload = setTimeout(() => { reload = null; load(); }, 2000);
    },
    stop() { clearTimeout(reload); },
  };
}

function decoded(text) {
  try {
    return decodeURIComponent(text);
  } catch (_) {
    return text;
  }
}

function render() {
  const { path, params } = parseHash();
  if (current) current.stop();
  let view;
  if (path.startsWith("/task/")) view = taskView(decoded(path.slice("/task/".length)));
  else if (path === "/nodes") view = nodesView();
  else if (path === "/cluster") view = clusterView();
  else if (path === "/graphs") view = graphsView();
  else if (path.startsWith("/graph/")) view = graphView(decoded(path.slice("/graph/".length)));
  else view = tasksView(params);
  current = view;
  for (const link of document.querySelectorAll("nav a")) {
    const here = path === link.getAttribute("href").slice(1) ||
      (path.startsWith("/task/") && link.id === "nav-tasks") ||
      (path.startsWith("/graph/") && link.id === "nav-graphs");
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.getElementById("view").replaceChildren(view.root);
  view.start();
}

changes.listeners.add((change) => { if (current) current.onChange(change); });
window.addEventListener("hashchange", () => { notice(""); render(); });
render();
changes.restart();
sampler.sample();
// One sample at a time, and none while the tab is hidden.
(async function sampleForever() {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, SAMPLE_EVERY_MS));
    if (!document.hidden) await sampler.sample();
  }
})();

// A hidden tab gives its connections back: the browser allows six to the
// agent (HTTP/1.1) over all its tabs, and each tab's change stream (and a
// followed log) holds one for as long as it is open.
document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    changes.stop();
    if (current) current.stop();
    changes.status(false, "paused while hidden");
  } else {
    changes.restart();
    // The same view, where it was (the same page of the list, say).
    if (current) current.start();
  }
});
