// pacore trace viewer: lists recent requests and shows one request's rounds.
// Model text is only ever inserted with textContent (never as HTML), so a
// trajectory that contains markup shows as the text it is.
"use strict";

const KEY_STORAGE = "pacore.apiKey";
const LIST_EVERY_MS = 2000;
const DETAIL_EVERY_MS = 800;

const state = {
  selected: null, // id of the request shown
  detail: null, // last detail of it, trajectories merged across polls
  detailTimer: null,
};

// --- DOM helpers -----------------------------------------------------------

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    // Through CSSOM: the page's Content-Security-Policy forbids inline style attributes.
    else if (name === "width") node.style.width = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const byId = (id) => document.getElementById(id);

function fmtTokens(n) {
  return n >= 10000 ? `${(n / 1000).toFixed(1)}k` : String(n);
}

function fmtSeconds(s) {
  if (s < 1) return `${Math.round(s * 1000)}ms`;
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  return `${m}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
}

function fmtSchedule(schedule) {
  return schedule.length ? `[${schedule.join(", ")}]` : "pass-through";
}

function answerLabel(answer) {
  return answer === null || answer === undefined ? "(no answer)" : answer;
}

// --- API --------------------------------------------------------------------

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function api(path) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) {
    notice(key ? "That API key was refused. Enter the server's key above." : "This server needs an API key: enter it above.");
    byId("api-key").focus();
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  notice("");
  return response.json();
}

function notice(text) {
  byId("notice").textContent = text;
}

// --- request list -------------------------------------------------------------

async function refreshList() {
  let data;
  try {
    data = (await api("/ui/api/requests")).data;
  } catch (error) {
    if (error.message !== "unauthorized") notice(`Cannot list requests: ${error.message}`);
    return;
  }
  const list = byId("request-list");
  list.replaceChildren(...data.map(listItem));
  byId("list-empty").hidden = data.length > 0;
  if (!state.selected && data.length && !location.hash) select(data[0].id);
}

function listItem(request) {
  const when = new Date(request.created * 1000).toLocaleTimeString();
  const link = el("a", { class: "request-item", href: `#${request.id}`, "data-id": request.id }, [
    el("div", { class: "line1" }, [
      el("span", { class: `badge ${request.status}`, text: request.status }),
      el("span", { text: when }),
      el("span", { text: fmtSchedule(request.schedule) }),
      el("span", { text: `${fmtTokens(request.completion_tokens)} tok` }),
    ]),
    el("div", { class: "question", text: request.question || "(no text)" }),
    request.answer !== null ? el("div", { class: "answer", text: `→ ${request.answer}` }) : null,
  ]);
  if (request.id === state.selected) link.classList.add("selected");
  return el("li", {}, [link]);
}

// --- one request ------------------------------------------------------------------

function select(id) {
  if (location.hash !== `#${id}`) {
    location.hash = id; // the hashchange listener loads it
    return;
  }
  state.selected = id;
  state.detail = null;
  for (const item of document.querySelectorAll(".request-item")) {
    item.classList.toggle("selected", item.dataset.id === id);
  }
  clearTimeout(state.detailTimer);
  pollDetail();
}

async function pollDetail() {
  const id = state.selected;
  if (!id) return;
  const since = state.detail ? state.detail.seq : 0;
  let fresh;
  try {
    fresh = await api(`/ui/api/requests/${encodeURIComponent(id)}?since=${since}`);
  } catch (error) {
    if (id !== state.selected) return;
    if (error.status === 404) {
      byId("detail").replaceChildren(el("p", { class: "muted empty", text: error.message }));
      return;
    }
    state.detailTimer = setTimeout(pollDetail, DETAIL_EVERY_MS * 3);
    return;
  }
  if (id !== state.selected) return;
  state.detail = merge(state.detail, fresh);
  renderDetail(state.detail);
  if (fresh.status === "running") state.detailTimer = setTimeout(pollDetail, DETAIL_EVERY_MS);
}

// The server sends only trajectories newer than `since`; keep the ones we have.
function merge(old, fresh) {
  const known = new Map();
  if (old) for (const round of old.rounds) known.set(round.index, round.trajectories);
  for (const round of fresh.rounds) {
    const byIndex = new Map((known.get(round.index) || []).map((t) => [t.index, t]));
    for (const t of round.trajectories) byIndex.set(t.index, t);
    round.trajectories = [...byIndex.values()].sort((a, b) => a.index - b.index);
  }
  return fresh;
}

function renderDetail(detail) {
  const finalAnswer = detail.final_answer;
  const head = el("div", { class: "request-head" }, [
    el("h1", {}, [
      el("span", { text: "Request" }),
      el("code", { text: detail.id }),
      el("span", { class: `badge ${detail.status}`, text: detail.status }),
    ]),
    el("div", { class: "question", text: detail.question || "(no text)" }),
    el("div", { class: "meta" }, [
      metaItem("model", detail.model),
      metaItem("schedule", fmtSchedule(detail.schedule)),
      metaItem("calls", `${detail.usage.calls}${detail.usage.failed_calls ? ` (${detail.usage.failed_calls} failed)` : ""}`),
      metaItem("completion tokens", fmtTokens(detail.usage.completion_tokens)),
      metaItem("prompt tokens", fmtTokens(detail.usage.prompt_tokens)),
      metaItem("time", fmtSeconds(detail.elapsed_s)),
      detail.images ? metaItem("images", String(detail.images)) : null,
      detail.stream ? metaItem("streamed", "yes") : null,
    ]),
  ]);
  const columns = el("div", { class: "rounds" }, detail.rounds.map((r) => roundColumn(r, detail, finalAnswer)));
  byId("detail").replaceChildren(head, finalBox(detail), columns);
}

function metaItem(label, value) {
  return el("span", {}, [document.createTextNode(`${label} `), el("b", { text: value })]);
}

function finalBox(detail) {
  if (detail.status === "failed" || detail.status === "cancelled") {
    return el("div", { class: "final failed" }, [
      el("h2", { text: detail.status === "failed" ? "Failed" : "Cancelled" }),
      el("div", { class: "text", text: detail.error || "" }),
      detail.partial_answer ? el("div", { class: "text muted", text: detail.partial_answer }) : null,
    ]);
  }
  if (detail.status === "running") {
    return el("div", { class: "final pending" }, [
      el("h2", { text: "Final answer (in progress)" }),
      el("div", { class: "text", text: detail.partial_answer || "waiting for the final round…" }),
    ]);
  }
  return el("div", { class: "final", id: "final-answer" }, [
    el("h2", { text: "Final answer" }),
    detail.final_answer !== null ? el("div", { class: "extracted", text: detail.final_answer }) : null,
    el("div", { class: "text", text: detail.answer || "" }),
  ]);
}

function roundColumn(round, detail, finalAnswer) {
  const total = detail.schedule.length + 1;
  const title = round.final ? "Final round" : `Round ${round.index + 1} of ${total}`;
  const stats = [
    `${round.done}/${round.k} done`,
    round.failed ? `${round.failed} failed` : null,
    `${fmtTokens(round.completion_tokens)} tok`,
    fmtSeconds(round.elapsed_s),
    round.bypassed ? "no references: the question was sent as is" : null,
  ].filter(Boolean).join(" · ");
  const column = el("div", {
    class: `round${round.finished ? " finished" : ""}${round.final ? " final-round" : ""}`,
    "data-round": String(round.index),
  }, [
    el("div", { class: "round-head" }, [
      el("h3", {}, [el("span", { text: title }), el("span", { class: "muted", text: `K=${round.k}` })]),
      el("div", { class: "stats", text: stats }),
      el("div", { class: "progress" }, [el("div", { width: `${(100 * round.done) / round.k}%` })]),
    ]),
    round.final ? null : distribution(round, finalAnswer),
    el("div", { class: "cards" }, [
      ...round.trajectories.map((t) => card(t, finalAnswer)),
      round.done < round.k ? el("div", { class: "card pending-card", text: `${round.k - round.done} running…` }) : null,
    ]),
  ]);
  return column;
}

function distribution(round, finalAnswer) {
  if (!round.distribution.length) return null;
  const most = round.distribution[0].count;
  return el("div", { class: "dist" }, [
    el("h4", { text: "Answers" }),
    ...round.distribution.map((entry) => {
      const winner = finalAnswer !== null && entry.answer === finalAnswer;
      return el("div", { class: `dist-row${winner ? " winner" : ""}`, title: answerLabel(entry.answer) }, [
        el("span", { class: "label", text: answerLabel(entry.answer) }),
        el("div", { class: "bar" }, [el("div", { width: `${(100 * entry.count) / most}%` })]),
        el("span", { class: "count", text: String(entry.count) }),
      ]);
    }),
  ]);
}

function card(t, finalAnswer) {
  const failed = t.error !== null;
  const matches = !failed && finalAnswer !== null && t.answer === finalAnswer;
  const facts = [`${t.completion_tokens} tok`, fmtSeconds(t.latency_s), t.finish_reason].filter(Boolean).join(" · ");
  return el("div", { class: `card${failed ? " failed" : ""}${matches ? " matches-final" : ""}`, "data-index": String(t.index) }, [
    el("div", { class: "card-head" }, [el("span", { class: "index", text: `#${t.index + 1}` }), el("span", { text: facts })]),
    failed ? null : el("span", { class: "chip", title: answerLabel(t.answer), text: answerLabel(t.answer) }),
    failed
      ? el("div", { class: "error", text: `${t.error_kind ? `${t.error_kind}: ` : ""}${t.error}` })
      : t.message
        ? el("div", { class: "message", text: t.message.trim() })
        : el("div", { class: "message placeholder", text: "(empty: contributes no message)" }),
  ]);
}

// --- wiring -------------------------------------------------------------------------

function start() {
  const input = byId("api-key");
  input.value = apiKey();
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, input.value.trim());
    notice("");
    refreshList();
    if (state.selected) select(state.selected);
  });
  window.addEventListener("hashchange", () => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id) select(id);
  });
  if (location.hash.length > 1) select(decodeURIComponent(location.hash.slice(1)));
  refreshList();
  setInterval(refreshList, LIST_EVERY_MS);
}

start();
