// verani's live inspector. Listens on /_verani/api/live (pushed updates, never polls the
// rooms) and acts through the HTTP API. Every value that comes from the rooms is set as text
// (textContent, text nodes): nothing here parses room data as HTML.

const TOKEN_KEY = "verani.apiToken";
const API = "/_verani/api";
const PAGE = 50;

const $ = (id) => document.getElementById(id);

let socket = null;
let retry = null;
let view = { filter: "", offset: 0, limit: PAGE };
let watched = null; // [room, instance]
let lastList = null;

/** An element with text children (strings become text nodes, never HTML). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const dash = (value) => (value === null || value === undefined ? "–" : String(value));

function setLink(text, on) {
  $("link").textContent = text;
  $("link").className = on ? "link on" : "link off";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function clearData() {
  $("main").hidden = true;
  $("rows").replaceChildren();
  $("detail-body").replaceChildren();
  $("detail").hidden = true;
  watched = null;
  lastList = null;
  for (const id of ["events", "frames", "commits", "connections", "awake"]) {
    $(`stat-${id}`).textContent = "–";
  }
}

// --- the live socket ----------------------------------------------------------------------

function connect() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    setLink("not connected", false);
    return;
  }
  clearTimeout(retry);
  if (socket) socket.close();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}${API}/live`);
  socket = ws;
  setLink("connecting…", false);
  ws.addEventListener("open", () => {
    // The token goes in the first message, never in the URL.
    ws.send(JSON.stringify({ type: "auth", token }));
  });
  ws.addEventListener("message", (event) => {
    if (ws !== socket) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    receive(message);
  });
  ws.addEventListener("close", (event) => {
    if (ws !== socket) return;
    socket = null;
    if (event.code === 4401) {
      sessionStorage.removeItem(TOKEN_KEY);
      clearData();
      setLink("not connected", false);
      showError("The server refused the token (close 4401): enter the API token again.");
      return;
    }
    setLink("disconnected; reconnecting…", false);
    retry = setTimeout(connect, 2000);
  });
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function receive(message) {
  switch (message.type) {
    case "hello":
      showError("");
      setLink("live", true);
      $("main").hidden = false;
      send({ type: "list", ...view });
      if (watched) send({ type: "watch", room: watched[0], instance: watched[1] });
      break;
    case "stats":
      showStats(message);
      break;
    case "instances":
      showList(message);
      break;
    case "detail":
      if (watched && message.room === watched[0] && message.instance === watched[1]) {
        showDetail(message);
      }
      break;
  }
}

// --- stats and the list ---------------------------------------------------------------------

function showStats(s) {
  $("stat-events").textContent = s.events_per_s;
  $("stat-frames").textContent = s.frames_per_s;
  $("stat-commits").textContent = s.commits_per_s;
  $("stat-connections").textContent = s.connections;
  $("stat-awake").textContent = s.awake;
}

function showList(list) {
  lastList = list;
  view.offset = list.offset;
  const first = list.total ? list.offset + 1 : 0;
  const last = Math.min(list.total, list.offset + list.rows.length);
  $("range").textContent = `${first}–${last} of ${list.total}`;
  $("prev").disabled = list.offset === 0;
  $("next").disabled = list.offset + list.limit >= list.total;
  const rows = list.rows.map((r) => {
    const key = `${r.room}/${r.instance}`;
    const selected = watched && watched[0] === r.room && watched[1] === r.instance;
    const status = r.error ? `${r.status} (unreadable)` : r.status;
    return el(
      "tr",
      { dataset: { key }, class: selected ? "selected" : "", onclick: () => watch(r.room, r.instance) },
      el("td", { class: "name" }, key),
      el("td", { class: `status status-${r.status}` }, status),
      el("td", { class: "sessions num" }, dash(r.sessions)),
      el("td", { class: "bytes num" }, dash(r.bytes)),
      el("td", { class: "saved" }, dash(r.saved_at)),
      el("td", { class: "hibernates num" }, r.hibernates_in === null ? "–" : `${r.hibernates_in}s`),
      el("td", { class: "pending" }, r.write_pending ? "writing" : ""),
    );
  });
  $("rows").replaceChildren(...rows);
}

function watch(room, instance) {
  watched = [room, instance];
  $("detail").hidden = false;
  $("detail-title").textContent = `${room}/${instance}`;
  $("detail-summary").textContent = "loading…";
  $("detail-body").replaceChildren();
  $("action-result").textContent = "";
  if (lastList) showList(lastList);
  send({ type: "watch", room, instance });
}

// --- one instance -----------------------------------------------------------------------------

function showDetail(d) {
  const body = [];
  if (d.error && !d.status) {
    $("detail-summary").textContent = d.error;
    $("detail-body").replaceChildren();
    return;
  }
  const live = d.live || {};
  const stored = d.stored;
  const r = d.rendered;
  const parts = [d.status];
  if (d.live) parts.push(`${live.sessions.length} session(s)`);
  if ("hibernates_in" in live) parts.push(`hibernates in ${live.hibernates_in}s if idle`);
  if (live.write_pending) parts.push("a write is in progress");
  if (stored) parts.push(`stored ${stored.bytes} bytes, saved ${stored.saved_at}`);
  if (d.served === false) parts.push("its room is not served by this server");
  $("detail-summary").textContent = parts.join(" · ");
  if (d.error) body.push(el("p", { class: "error" }, `stored document unreadable: ${d.error}`));

  // Persisted state: as stored next to as live, differences marked.
  const keys = [...new Set([...Object.keys(r.stored_state), ...Object.keys(r.live_state)])];
  body.push(el("h3", {}, "persisted state"));
  if (keys.length) {
    body.push(
      el(
        "table",
        { id: "state" },
        el("thead", {}, el("tr", {}, el("th", {}, "key"), el("th", {}, "stored"), el("th", {}, "live"))),
        el(
          "tbody",
          {},
          ...keys.map((key) => {
            const s = r.stored_state[key];
            const l = r.live_state[key];
            const differs = d.live && "state" in live && s !== l;
            return el(
              "tr",
              { dataset: { key }, class: differs ? "differs" : "" },
              el("td", {}, key),
              el("td", { class: "stored" }, el("pre", {}, dash(s))),
              el("td", { class: "live" }, el("pre", {}, "state" in live ? dash(l) : "(asleep)")),
            );
          }),
        ),
      ),
    );
  } else {
    body.push(el("p", { class: "muted" }, "(none)"));
  }
  body.push(valuesTable("ephemeral state (in memory)", "ephemeral", r.ephemeral, live.unencodable));
  body.push(valuesTable("actor.storage", "storage", r.storage));

  body.push(el("h3", {}, "schedules"));
  const schedules = Object.entries(r.schedules);
  body.push(
    schedules.length
      ? el(
          "table",
          { id: "schedules" },
          el("thead", {}, el("tr", {}, ...["key", "event", "due", "every", "data"].map((h) => el("th", {}, h)))),
          el(
            "tbody",
            {},
            ...schedules.map(([key, s]) =>
              el(
                "tr",
                {},
                el("td", {}, key),
                el("td", {}, dash(s.event)),
                el("td", {}, dash(s.due)),
                el("td", {}, s.every ? `${s.every}s` : "–"),
                el("td", {}, el("pre", {}, s.data)),
              ),
            ),
          ),
        )
      : el("p", { class: "muted" }, "(none)"),
  );

  body.push(el("h3", {}, "sessions"));
  const sessions = live.sessions || [];
  body.push(
    sessions.length
      ? el(
          "table",
          { id: "sessions" },
          el("thead", {}, el("tr", {}, ...["user", "client id", "channels", "meta", ""].map((h) => el("th", {}, h)))),
          el(
            "tbody",
            {},
            ...sessions.map((s) =>
              el(
                "tr",
                { dataset: { client: s.client_id } },
                el("td", {}, dash(s.user_id)),
                el("td", {}, s.client_id),
                el("td", {}, s.channels.join(", ") || "–"),
                el("td", {}, el("pre", {}, Object.keys(s.extra).length ? JSON.stringify(s.extra) : "")),
                el("td", {}, el("button", { type: "button", class: "disconnect", onclick: () => disconnect(s) }, "Disconnect")),
              ),
            ),
          ),
        )
      : el("p", { class: "muted" }, d.served ? "none" : "(no server view)"),
  );
  $("detail-body").replaceChildren(...body);
}

function valuesTable(title, id, values, unencodable = {}) {
  const entries = Object.entries(values || {});
  const odd = Object.entries(unencodable || {});
  const wrap = el("div", {}, el("h3", {}, title));
  if (!entries.length && !odd.length) {
    wrap.append(el("p", { class: "muted" }, "(empty)"));
    return wrap;
  }
  wrap.append(
    el(
      "table",
      { id },
      el(
        "tbody",
        {},
        ...entries.map(([key, text]) => el("tr", { dataset: { key } }, el("td", {}, key), el("td", {}, el("pre", {}, text)))),
        ...odd.map(([key, text]) => el("tr", { dataset: { key } }, el("td", {}, key), el("td", {}, el("pre", {}, `${text}  (not encodable)`)))),
      ),
    ),
  );
  return wrap;
}

// --- actions, through the HTTP API, each confirmed ------------------------------------------

function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function api(action, body) {
  const [room, instance] = watched;
  const path = `${API}/rooms/${encodeURIComponent(room)}/${encodeURIComponent(instance)}/${action}`;
  const response = await fetch(path, {
    method: "POST",
    headers: {
      Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`,
      "Content-Type": "application/json",
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let reply = {};
  try {
    reply = await response.json();
  } catch {
    reply = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(reply.error || `HTTP ${response.status}`);
  return reply;
}

async function act(question, action, body, done) {
  if (!watched) return;
  const target = `${watched[0]}/${watched[1]}`;
  if (!(await confirmAction(`${question} ${target}?`))) return;
  const result = $("action-result");
  result.textContent = "…";
  try {
    result.textContent = done(await api(action, body));
  } catch (error) {
    result.textContent = `failed: ${error.message}`;
  }
}

function parseEmitData() {
  const text = $("emit-data").value.trim();
  if (!text) return { ok: true, data: null };
  try {
    return { ok: true, data: JSON.parse(text) };
  } catch (error) {
    return { ok: false, error: `data is not JSON: ${error.message}` };
  }
}

function checkEmit() {
  const parsed = parseEmitData();
  $("emit-check").textContent = parsed.ok ? "" : parsed.error;
  $("emit-send").disabled = !parsed.ok;
  return parsed;
}

function disconnect(session) {
  act(`Disconnect client ${session.client_id} (user ${session.user_id}) from`, "disconnect", { client_id: session.client_id }, (r) => `disconnected ${r.disconnected} socket(s)`);
}

// --- wiring -----------------------------------------------------------------------------------

let filterTimer = null;

function start() {
  $("token").value = "";
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value;
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    showError("");
    connect();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close();
    }
    clearData();
    setLink("not connected", false);
  });
  $("filter").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      view = { ...view, filter: $("filter").value, offset: 0 };
      send({ type: "list", ...view });
    }, 200);
  });
  $("prev").addEventListener("click", () => {
    view = { ...view, offset: Math.max(0, view.offset - view.limit) };
    send({ type: "list", ...view });
  });
  $("next").addEventListener("click", () => {
    view = { ...view, offset: view.offset + view.limit };
    send({ type: "list", ...view });
  });
  $("hibernate").addEventListener("click", () => {
    act("Hibernate", "hibernate", undefined, (r) => (r.hibernated.length ? "hibernated" : "already asleep"));
  });
  $("emit-data").addEventListener("input", checkEmit);
  $("emit").addEventListener("submit", (event) => {
    event.preventDefault();
    const parsed = checkEmit();
    if (!parsed.ok) return;
    const body = { event: $("emit-event").value, data: parsed.data };
    const user = $("emit-user").value.trim();
    const channel = $("emit-channel").value.trim();
    if (user) body.user_id = user;
    else if (channel) body.channel = channel;
    act(`Emit ${body.event} into`, "emit", body, (r) => `sent to ${r.sent} socket(s)`);
  });
  connect();
}

start();
