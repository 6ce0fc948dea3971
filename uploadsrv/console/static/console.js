// The console page: live sessions from the server-wide event stream, one session's
// detail (chunk map, offset, history), a throughput chart, and a try-an-upload panel.
import { ChunkUpload, TusUpload, fingerprint, savedUploads, sha256 } from "./upload.js";

const API = new URL("api/", location.href.replace(/[?#].*$/, "")).href;
const TOKEN_KEY = "uploadsrv.console.token";
const CHART_SECONDS = 600;
const BAR_SECONDS = 10;
const $ = (selector) => document.querySelector(selector);

const sessions = new Map(); // id -> row
let rates = {}; // id -> bytes/s, from the last tick
const seconds = new Map(); // second -> bytes stored
let detail = null; // {id, session, chunks: Map, history: []}
let stream = null; // AbortController of the event stream
let paths = { files: "/files/", chunks: "/chunks/" }; // the server's upload endpoints
let server = { auth: "none", viewer: { owner: null, operator: true } }; // from the snapshot

// -- the token: typed in, or passed once in the URL fragment, kept for this tab only --

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
}

class Denied extends Error {}

function credentials() {
  return token() ? { Authorization: `Bearer ${token()}` } : {}; // behind an auth proxy: none
}

/** What the page's own uploads carry: the user's token when the server's auth reads it. */
function uploadCredentials() {
  const bearer = ["bearer", "jwt"].includes(server.auth) && !server.viewer.operator;
  return bearer ? credentials() : {};
}

async function api(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    headers: { ...credentials(), ...(options.headers || {}) },
    cache: "no-store",
  });
  if (response.status === 401) throw new Denied("the console token was refused");
  return response;
}

// -- the event stream (fetch, because EventSource cannot send the token) -------------

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function connect() {
  if (stream) stream.abort();
  const controller = new AbortController();
  stream = controller;
  let delay = 1000;
  while (!controller.signal.aborted) {
    setConnection("retrying", "connecting…");
    try {
      const response = await api("events", { signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setConnection("live", "live");
      delay = 1000;
      for await (const { name, data } of events(response)) handle(name, data);
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof Denied) {
        setConnection("denied", error.message);
        showLogin(error.message);
        return;
      }
    }
    if (controller.signal.aborted) return;
    setConnection("retrying", `reconnecting in ${delay / 1000} s`);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function setConnection(state, text) {
  const element = $("#connection");
  element.dataset.state = state;
  element.textContent = text;
}

function handle(name, data) {
  if (name === "snapshot") {
    paths = data.paths;
    server = { auth: data.auth, viewer: data.viewer };
    $("#viewer").textContent = data.viewer.operator ? "operator" : `signed in as ${data.viewer.owner}`;
    sessions.clear();
    for (const row of data.sessions) sessions.set(row.id, row);
    seconds.clear();
    for (const [second, bytes] of data.throughput) seconds.set(second, bytes);
    applyTick(data);
    if (detail) openDetail(detail.id);
  } else if (name === "upload" || name === "chunk") {
    sessions.set(data.session.id, data.session);
    if (detail && detail.id === data.session.id) updateDetail(name, data);
  } else if (name === "tick") {
    applyTick(data);
  } else if (name === "resync") {
    throw new Error("resync"); // reconnect: a fresh snapshot
  }
  scheduleRender();
}

function applyTick(data) {
  rates = data.rates || {};
  for (const [second, bytes] of data.seconds || []) seconds.set(second, bytes);
  $("#rate").textContent = (data.bytes_per_second / 1e6).toFixed(data.bytes_per_second >= 1e7 ? 0 : 1);
}

// -- rendering ------------------------------------------------------------------------

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    renderTable();
    renderChart();
  });
}

function stateOf(row) {
  return row.state === "incomplete" && rates[row.id] ? "active" : row.state;
}

function renderTable() {
  const filters = Object.fromEntries(new FormData($("#filters")));
  const owners = new Set([...sessions.values()].map((row) => row.owner).filter(Boolean));
  syncOptions($("#filters select[name=owner]"), owners);
  const rows = [...sessions.values()]
    .filter((row) => !filters.state || stateOf(row) === filters.state)
    .filter((row) => !filters.owner || row.owner === filters.owner)
    .filter((row) => !filters.protocol || row.protocol === filters.protocol)
    .sort((a, b) => b.last_activity - a.last_activity);
  const body = $("#sessions tbody");
  const focused = document.activeElement && document.activeElement.closest("#sessions tr");
  body.replaceChildren(...rows.map(renderRow));
  if (focused) { // keep the keyboard's place across live updates
    const again = body.querySelector(`tr[data-id="${focused.dataset.id}"] a`);
    if (again) again.focus();
  }
  $("#empty").hidden = rows.length > 0;
  $("#count").textContent = sessions.size;
  $("#active").textContent = [...sessions.values()].filter((row) => stateOf(row) === "active").length;
}

function syncOptions(select, values) {
  const have = new Set([...select.options].map((option) => option.value));
  for (const value of [...values].sort()) {
    if (!have.has(value)) select.append(new Option(value, value));
  }
}

function renderRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.id = row.id;
  if (detail && detail.id === row.id) tr.className = "selected";
  const link = Object.assign(document.createElement("a"), { href: `#session/${row.id}`, textContent: row.id.slice(0, 8) });
  link.title = row.id;
  const state = Object.assign(document.createElement("span"), { className: "state", textContent: stateOf(row) });
  state.dataset.state = stateOf(row);
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = fraction(row);
  bar.setAttribute("aria-label", `${Math.round(fraction(row) * 100)}%`);
  const cells = [
    [link],
    [row.owner || "–", "wide"],
    [row.protocol],
    [state],
    [bytes(row.size), "num"],
    [bar],
    [rates[row.id] ? `${bytes(rates[row.id])}/s` : "–", "num"],
    [ago(row.last_activity), "wide"],
    [row.expires_at ? until(row.expires_at) : "–", "wide"],
  ];
  for (const [content, className] of cells) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.append(content);
    tr.append(td);
  }
  return tr;
}

function fraction(row) {
  if (row.state === "complete") return 1;
  return row.size ? row.received / row.size : 0;
}

function renderChart() {
  const svg = $("#chart");
  const now = Math.floor(Date.now() / 1000);
  const bars = CHART_SECONDS / BAR_SECONDS;
  const sums = new Array(bars).fill(0);
  for (const [second, value] of seconds) {
    const age = now - second;
    if (age < 0 || age >= CHART_SECONDS) {
      if (age >= CHART_SECONDS) seconds.delete(second);
      continue;
    }
    sums[bars - 1 - Math.floor(age / BAR_SECONDS)] += value;
  }
  const peak = Math.max(...sums);
  const width = 600 / bars;
  svg.replaceChildren(
    ...sums.map((value, i) => {
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const height = peak ? (value / peak) * 116 : 0;
      rect.setAttribute("x", String(i * width + 0.5));
      rect.setAttribute("width", String(width - 1));
      rect.setAttribute("y", String(120 - height));
      rect.setAttribute("height", String(height));
      return rect;
    }),
  );
  $("#chart-peak").textContent = `peak ${bytes(peak / BAR_SECONDS)}/s`;
}

// -- one session ------------------------------------------------------------------------

async function openDetail(id) {
  try {
    const response = await api(`sessions/${id}`);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.json();
    detail = { id, session: body.session, chunks: new Map(body.chunks), history: body.history };
    $("#detail-record").textContent = JSON.stringify(body.record, null, 2);
    $("#detail").hidden = false;
    renderDetail();
  } catch (error) {
    if (error instanceof Denied) return showLogin(error.message);
    detail = { id, session: sessions.get(id) || { id, state: "unknown" }, chunks: new Map(), history: [] };
    $("#detail").hidden = false;
    renderDetail();
  }
  scheduleRender();
}

function updateDetail(name, data) {
  detail.session = data.session;
  if (name === "chunk") detail.chunks.set(data.number, data.entry.bytes);
  detail.history.push(data.entry);
  renderDetail();
}

function renderDetail() {
  const { id, session, chunks, history: events } = detail;
  $("#detail-id").textContent = id;
  $("#detail").dataset.state = session.state;
  const done = session.state === "complete";
  const progress = $("#detail-progress");
  progress.value = fraction(session);
  $("#detail-progress-text").textContent =
    session.chunk_count != null
      ? `${done ? session.chunk_count : chunks.size} of ${session.chunk_count} chunks · ${bytes(session.received)} of ${bytes(session.size)}`
      : `offset ${bytes(session.received)} of ${bytes(session.size)}`;
  renderChunkMap(session, chunks);
  const meta = {
    state: session.state,
    protocol: session.protocol,
    owner: session.owner || "–",
    "file name": session.filename || "–",
    size: session.size == null ? "deferred" : `${bytes(session.size)} (${session.size.toLocaleString()} bytes)`,
    created: time(session.created_at),
    "last activity": time(session.last_activity),
    expires: session.expires_at ? time(session.expires_at) : "–",
  };
  if (session.chunk_size) meta["chunk size"] = bytes(session.chunk_size);
  $("#detail-meta").replaceChildren(
    ...Object.entries(meta).flatMap(([name, value]) => [
      Object.assign(document.createElement("dt"), { textContent: name }),
      Object.assign(document.createElement("dd"), { textContent: value }),
    ]),
  );
  const download = $("#detail-download");
  download.hidden = !done;
  if (done) {
    download.href = new URL(paths.files + id, location.href).href;
    download.setAttribute("download", session.filename || id);
  }
  $("#detail-delete").disabled = session.state === "terminated";
  $("#detail-history").replaceChildren(...events.slice(-200).map(renderEvent));
}

function renderChunkMap(session, chunks) {
  const map = $("#chunk-map");
  const isChunked = session.chunk_count != null;
  map.hidden = !isChunked;
  $("#chunk-legend").hidden = !isChunked;
  if (!isChunked) return;
  if (map.childElementCount !== session.chunk_count) {
    map.replaceChildren(
      ...Array.from({ length: session.chunk_count }, (_, i) => {
        const cell = document.createElement("span");
        cell.dataset.chunk = String(i + 1);
        return cell;
      }),
    );
  }
  const writing = new Set(session.writing || []);
  const complete = session.state === "complete";
  let stored = 0;
  for (const cell of map.children) {
    const n = Number(cell.dataset.chunk);
    const state = complete || chunks.has(n) ? "stored" : writing.has(n) ? "writing" : "missing";
    if (state === "stored") stored += 1;
    cell.className = `cell ${state === "missing" ? "" : state}`.trim();
    cell.title = `chunk ${n}: ${state === "writing" ? "being written" : state}`;
  }
  map.setAttribute("aria-label", `chunk map: ${stored} of ${session.chunk_count} chunks stored`);
  map.dataset.stored = String(stored);
}

function renderEvent(entry) {
  const li = document.createElement("li");
  let text = `${time(entry.at)} ${entry.event}`;
  if (entry.chunk != null) text += ` ${entry.chunk} (${bytes(entry.bytes)})`;
  else if (entry.offset != null) text += ` → offset ${entry.offset.toLocaleString()} (+${bytes(entry.bytes)})`;
  li.textContent = text;
  return li;
}

async function deleteSession() {
  const dialog = $("#confirm-delete");
  $("#confirm-id").textContent = detail.id;
  dialog.returnValue = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  if (dialog.returnValue !== "delete") return;
  const response = await api(`sessions/${detail.id}`, { method: "DELETE" });
  if (response.status !== 204) alertIn("#detail-history", `delete failed: HTTP ${response.status}`);
}

function alertIn(selector, text) {
  const li = Object.assign(document.createElement("li"), { textContent: text, className: "error" });
  $(selector).append(li);
}

function route() {
  const match = /^#session\/([0-9a-f]{32})$/.exec(location.hash);
  if (match) {
    openDetail(match[1]);
  } else {
    detail = null;
    $("#detail").hidden = true;
    scheduleRender();
  }
}

// -- try an upload ----------------------------------------------------------------------

let file = null;
let upload = null;

function pick(chosen) {
  if (upload && ["uploading", "retrying", "offline"].includes(upload.state)) upload.pause();
  file = chosen;
  upload = null;
  $("#file-name").textContent = `${file.name} · ${bytes(file.size)}`;
  $("#start").disabled = false;
  $("#pause").disabled = $("#resume").disabled = true;
  $("#try-result").replaceChildren();
  const saved = savedUploads()[fingerprint(file)];
  if (saved) {
    document.querySelector(`input[name=protocol][value=${saved.protocol}]`).checked = true;
    $("#try-status").textContent = `an unfinished ${saved.protocol} upload of this file exists: Upload resumes it`;
  } else {
    $("#try-status").textContent = "";
  }
}

async function startUpload() {
  const protocol = document.querySelector("input[name=protocol]:checked").value;
  $("#start").disabled = true;
  setTry("hashing", "computing the file's SHA-256…");
  const local = await sha256(file);
  upload =
    protocol === "tus"
      ? new TusUpload(file, new URL(paths.files, location.href).href, uploadCredentials())
      : new ChunkUpload(file, new URL(paths.chunks, location.href).href, uploadCredentials(), local);
  upload.localSha256 = local;
  upload.addEventListener("state", ({ detail: { state, message } }) => onUploadState(state, message));
  upload.addEventListener("progress", ({ detail: { confirmed, inFlight, size } }) => {
    const sent = Math.min(size, confirmed + inFlight);
    $("#try-progress").value = size ? sent / size : 1;
    $("#try-progress").dataset.confirmed = String(confirmed);
    $("#try-progress-text").textContent = `${bytes(confirmed)} stored of ${bytes(size)}`;
  });
  upload.start();
}

function onUploadState(state, message) {
  const resumed = upload.resumedFrom != null ? ` (resumed at ${bytes(upload.resumedFrom)})` : "";
  setTry(state, message + (state === "uploading" ? resumed : ""));
  const active = ["uploading", "retrying", "offline"].includes(state);
  $("#pause").disabled = !active;
  $("#resume").disabled = state !== "paused";
  $("#start").disabled = active || state === "paused" || state === "done";
  if (state === "done") verify(upload);
}

function setTry(state, message) {
  const status = $("#try-status");
  status.dataset.state = state;
  status.textContent = message;
}

async function verify(done) {
  const result = $("#try-result");
  const entries = {
    protocol: done.protocol,
    size: `${done.size.toLocaleString()} bytes`,
    "bytes sent": `${done.bytesSent.toLocaleString()} (by the browser's progress events, resends included)`,
  };
  const link = Object.assign(document.createElement("a"), { href: done.downloadUrl, textContent: done.downloadUrl });
  const remote = await fetch(done.downloadUrl, { cache: "no-store" }).then((r) => (r.ok ? r.arrayBuffer() : null));
  const downloaded = remote && (await sha256(remote));
  entries["local sha-256"] = done.localSha256 || "unavailable (needs https or localhost)";
  entries["server's copy"] = downloaded || "unavailable";
  const match = Boolean(downloaded && downloaded === done.localSha256);
  entries.verdict = match ? "identical ✓" : "DIFFERENT";
  result.replaceChildren(
    Object.assign(document.createElement("dt"), { textContent: "download" }),
    Object.assign(document.createElement("dd"), {}),
    ...Object.entries(entries).flatMap(([name, value]) => [
      Object.assign(document.createElement("dt"), { textContent: name }),
      Object.assign(document.createElement("dd"), { textContent: value }),
    ]),
  );
  result.children[1].append(link);
  result.dataset.match = String(match);
  result.dataset.bytesSent = String(done.bytesSent);
  result.dataset.resumedFrom = done.resumedFrom == null ? "" : String(done.resumedFrom);
  result.dataset.url = done.downloadUrl;
}

function showResumeHint() {
  const saved = Object.values(savedUploads());
  const hint = $("#resume-hint");
  hint.hidden = saved.length === 0;
  hint.textContent = saved.length
    ? `Unfinished: ${saved.map((s) => `${s.name} (${bytes(s.size)}, ${s.protocol})`).join(", ")}. Pick the same file to resume it.`
    : "";
}

// -- formatting -------------------------------------------------------------------------

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let value = n;
  while (value >= 1000 && i < units.length - 1) { value /= 1000; i += 1; }
  return `${value >= 100 || i === 0 ? Math.round(value) : value.toFixed(1)} ${units[i]}`;
}

function time(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "–";
}

function ago(seconds) {
  return span(Date.now() / 1000 - seconds) + " ago";
}

function until(seconds) {
  return "in " + span(seconds - Date.now() / 1000);
}

function span(s) {
  s = Math.max(0, s);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

// -- wiring -----------------------------------------------------------------------------

function showLogin(message) {
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#token-input").focus();
}

function main() {
  takeTokenFromFragment();
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
    $("#token-input").value = "";
    $("#login").hidden = true;
    connect();
    route();
  });
  $("#filters").addEventListener("change", scheduleRender);
  $("#detail-delete").addEventListener("click", deleteSession);
  window.addEventListener("hashchange", route);
  setInterval(scheduleRender, 1000); // relative times and the chart move on

  $("#file").addEventListener("change", (event) => event.target.files[0] && pick(event.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) pick(event.dataTransfer.files[0]);
  });
  $("#start").addEventListener("click", startUpload);
  $("#pause").addEventListener("click", () => upload && upload.pause());
  $("#resume").addEventListener("click", () => upload && upload.start());
  showResumeHint();

  connect(); // without a token too: an auth proxy in front may vouch for the user
  route();
}

main();
