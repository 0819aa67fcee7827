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
  requests: [], // the last list fetched, filtered on the page
  openPrompts: new Set(), // "round:index" of the cards whose prompt is shown, kept across redraws
  listTimer: null,
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

// Local date and time: a history can span days.
function fmtDate(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleString() : "";
}

function gradeLabel(correct) {
  return correct === true ? "correct" : correct === false ? "wrong" : null;
}

// A batch run's answer graded wrong because it could not be compared (its grade note says why)
// shows as "not judged", the note in its tooltip; any other grade as its label.
function gradeBadge(request) {
  const grade = gradeLabel(request.correct);
  if (!grade) return null;
  if (request.correct === false && request.grade_note) {
    const title = `graded wrong without being judged: ${request.grade_note}`;
    return el("span", { class: "badge wrong not-judged", title, text: "not judged" });
  }
  return el("span", { class: `badge ${grade}`, text: grade });
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
  let body;
  try {
    body = await api("/ui/api/requests");
  } catch (error) {
    if (error.message !== "unauthorized") notice(`Cannot list requests: ${error.message}`);
    return;
  }
  if (body.source) showSource(body.source);
  state.requests = body.data;
  renderList();
  if (!state.selected && body.data.length && !location.hash) select(body.data[0].id);
}

// `pacore view RUN_DIR`: a batch run, read-only, no API key; its list can be long and
// changes only while the run goes on, so it is read once (reload the page for more).
function showSource(source) {
  clearInterval(state.listTimer);
  byId("key-form").hidden = true;
  byId("list-title").textContent = "Results";
  byId("source").textContent = `run ${source.run} · read-only`;
  document.title = `pacore · ${source.run}`;
}

function searchText(request) {
  return [request.id, request.title, request.status, gradeLabel(request.correct),
    request.grade_note ? `not judged ${request.grade_note}` : null, request.model, request.question, request.answer, fmtDate(request.created)].filter(Boolean).join("\n").toLowerCase();
}

function renderList() {
  const words = byId("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = state.requests.filter((r) => words.every((w) => searchText(r).includes(w)));
  byId("request-list").replaceChildren(...shown.map(listItem));
  byId("list-empty").hidden = state.requests.length > 0;
  const count = byId("filter-count");
  count.textContent = words.length ? `${shown.length} of ${state.requests.length}` : "";
}

function listItem(request) {
  const link = el("a", { class: "request-item", href: `#${request.id}`, "data-id": request.id }, [
    el("div", { class: "line1" }, [
      el("span", { class: `badge ${request.status}`, text: request.status }),
      gradeBadge(request),
      el("span", { class: "when", text: fmtDate(request.created) }),
      el("span", { text: fmtSchedule(request.schedule) }),
      el("span", { text: `${fmtTokens(request.completion_tokens)} tok` }),
    ]),
    request.title ? el("div", { class: "title", text: request.title }) : null,
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
  state.openPrompts.clear();
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

// The server sends only trajectories (and a round's prompt) newer than `since`; keep the ones we have.
function merge(old, fresh) {
  const known = new Map();
  if (old) for (const round of old.rounds) known.set(round.index, round);
  for (const round of fresh.rounds) {
    const before = known.get(round.index);
    const byIndex = new Map((before ? before.trajectories : []).map((t) => [t.index, t]));
    for (const t of round.trajectories) byIndex.set(t.index, t);
    round.trajectories = [...byIndex.values()].sort((a, b) => a.index - b.index);
    if (round.prompt === null && before) round.prompt = before.prompt;
  }
  return fresh;
}

// The trace as JSON, built in the page: the download needs the API key header a plain link cannot send.
async function downloadTrace(id) {
  let trace;
  try {
    trace = await api(`/ui/api/traces/${encodeURIComponent(id)}`);
  } catch (error) {
    notice(`Cannot download the trace: ${error.message}`);
    return;
  }
  const blob = new Blob([JSON.stringify(trace, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: `${id.replace(/[^\w.-]+/g, "_")}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function renderDetail(detail) {
  const finalAnswer = detail.final_answer;
  const download = el("button", { type: "button", id: "download", text: "Download JSON" });
  download.addEventListener("click", () => downloadTrace(detail.id));
  const head = el("div", { class: "request-head" }, [
    el("h1", {}, [
      el("span", { text: detail.title ? "Result" : "Request" }),
      el("code", { text: detail.title || detail.id }),
      el("span", { class: `badge ${detail.status}`, text: detail.status }),
      gradeBadge(detail),
      download,
    ]),
    el("div", { class: "question", text: detail.question || "(no text)" }),
    el("div", { class: "meta" }, [
      metaItem("started", fmtDate(detail.created)),
      detail.finished ? metaItem("finished", fmtDate(detail.finished)) : null,
      metaItem("model", detail.model),
      metaItem("schedule", fmtSchedule(detail.schedule)),
      metaItem("calls", `${detail.usage.calls}${detail.usage.failed_calls ? ` (${detail.usage.failed_calls} failed)` : ""}`),
      metaItem("completion tokens", fmtTokens(detail.usage.completion_tokens)),
      metaItem("prompt tokens", fmtTokens(detail.usage.prompt_tokens)),
      metaItem("time", fmtSeconds(detail.elapsed_s)),
      detail.images ? metaItem("images", String(detail.images)) : null,
      detail.stream ? metaItem("streamed", "yes") : null,
      detail.kind ? metaItem("grading", detail.kind) : null,
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
  // The answer is the text; an extracted answer only means something under a grading kind.
  const graded = detail.kind && detail.final_answer !== null;
  return el("div", { class: `final${detail.correct === false ? " wrong" : ""}`, id: "final-answer" }, [
    el("h2", { text: "Final answer" }),
    el("div", { class: "text answer-text", text: detail.answer || "" }),
    graded
      ? el("div", { class: "extracted-line" }, [
        el("span", { class: "muted", text: `extracted (${detail.kind}) ` }),
        el("span", { class: "extracted", text: detail.final_answer }),
      ])
      : null,
    detail.ground_truth !== null && detail.ground_truth !== undefined
      ? el("div", { class: "truth" }, [
        el("span", { class: "muted", text: "ground truth " }),
        el("b", { text: detail.ground_truth }),
        gradeBadge(detail),
      ])
      : null,
    detail.correct === false && detail.grade_note
      ? el("div", {
        class: "grade-note",
        text: `Not judged: ${detail.grade_note}. Graded wrong: the answers could not be compared.`,
      })
      : null,
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
    round.dropped && round.dropped.length ? `${round.dropped.length} references dropped by keep-top` : null,
  ].filter(Boolean).join(" · ");
  const column = el("div", {
    class: `round${round.finished ? " finished" : ""}${round.final ? " final-round" : ""}`,
    "data-round": String(round.index),
  }, [
    el("div", { class: "round-head" }, [
      el("h3", {}, [el("span", { text: title }), el("span", { class: "muted", text: `K=${round.k}` })]),
      el("div", { class: "stats", text: stats }),
      round.policy_note ? el("div", { class: "policy-note", text: round.policy_note }) : null,
      round.dropped && round.dropped.length ? droppedLine(round.dropped) : null,
      el("div", { class: "progress" }, [el("div", { width: `${(100 * round.done) / round.k}%` })]),
    ]),
    round.final ? null : distribution(round, finalAnswer),
    el("div", { class: "cards" }, [
      ...round.trajectories.map((t) => card(t, finalAnswer, round)),
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

// The previous round's messages keep-top left out of this round's synthesis prompt.
function droppedLine(dropped) {
  const names = dropped.map(([r, i]) => `R${r + 1}#${i + 1}`).join(", ");
  return el("div", { class: "dropped", text: `dropped (least confident): ${names}` });
}

// DeepConf's figures: mean token confidence, lowest sliding-window group, tail.
function confidenceLine(c) {
  const text = `confidence ${c.mean.toFixed(2)} · lowest group ${c.lowest_group.toFixed(2)} · tail ${c.tail.toFixed(2)}`;
  return el("div", { class: "confidence", title: `window ${c.window} of ${c.token_count} tokens`, text });
}

function card(t, finalAnswer, round) {
  const failed = t.error !== null;
  const matches = !failed && finalAnswer !== null && t.answer === finalAnswer;
  const facts = [`${t.completion_tokens} tok`, fmtSeconds(t.latency_s), t.finish_reason].filter(Boolean).join(" · ");
  const stopped = t.stopped ? el("span", { class: "badge stopped", text: `stopped: ${t.stopped.replace("_", " ")}` }) : null;
  return el("div", { class: `card${failed ? " failed" : ""}${matches ? " matches-final" : ""}${t.stopped ? " stopped" : ""}`, "data-index": String(t.index) }, [
    el("div", { class: "card-head" }, [el("span", { class: "index", text: `#${t.index + 1}` }), stopped, el("span", { text: facts })]),
    t.confidence ? confidenceLine(t.confidence) : null,
    failed || t.answer === null ? null : el("span", { class: "chip", title: t.answer, text: t.answer }),
    round.prompt ? promptBox(round, t) : null,
    failed
      ? el("div", { class: "error", text: `${t.error_kind ? `${t.error_kind}: ` : ""}${t.error}` })
      : t.message
        ? el("div", { class: "message", text: t.message.trim() })
        : el("div", { class: "message placeholder", text: "(empty: contributes no message)" }),
  ]);
}

// The synthesis prompt the call received, collapsed; its text is only put in the page once opened.
function promptBox(round, t) {
  const key = `${round.index}:${t.index}`;
  const box = el("details", { class: "prompt" }, [el("summary", { text: "Prompt received" })]);
  const fill = () => {
    if (box.open && box.childElementCount === 1) {
      box.append(el("div", { class: "muted note", text: "Sent as the last user message, in place of the question." }));
      box.append(el("pre", { class: "prompt-text", text: round.prompt }));
    }
  };
  box.addEventListener("toggle", () => {
    if (box.open) state.openPrompts.add(key); else state.openPrompts.delete(key);
    fill();
  });
  if (state.openPrompts.has(key)) {
    box.open = true;
    fill();
  }
  return box;
}

// --- wiring -------------------------------------------------------------------------

function start() {
  byId("filter").addEventListener("input", renderList);
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
  state.listTimer = setInterval(refreshList, LIST_EVERY_MS);
  refreshList();
}

start();
