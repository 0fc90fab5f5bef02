// The chat page of `gguf-mtp serve`: the server's own streaming /v1/chat/completions, with each token shaded when a
// kept draft produced it (the stream's extra `mtp.draft` field), and live drafting figures for the reply (from the
// stream and its usage) and for the server (from /metrics). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "gguf-mtp-api-key"; // sessionStorage: gone when the tab closes
const POLL_MS = 1000;
const PAINT_MS = 50; // a fast stream is drawn (and the page answers clicks) at least this often
const METRIC = "gguf_mtp_";

const chat = { model: null, history: [], attached: {}, controller: null, needsKey: false, asking: null,
               pinned: true }; // pinned: the conversation is scrolled to its end, so it follows new text

// The files a message can carry, one pending of each kind (chat.attached[kind]): what the page keeps of one (from
// its name and FileReader's data: URL), the content part it goes out as, and how the user's message shows it.
// The page does not know whether the model takes a kind: the server's 400 (images_not_supported,
// audio_not_supported, invalid_image_url, invalid_audio) is shown as the reply's error.
const ATTACHMENTS = {
  image: {
    hold: (name, url) => ({ name, url }),
    part: (a) => ({ type: "image_url", image_url: { url: a.url } }),
    show(a) {
      const img = document.createElement("img");
      img.src = a.url;
      img.alt = `attached image ${a.name}`;
      return img;
    },
  },
  audio: {
    // input_audio is plain base64 and a format; the server reads the bytes whatever their kind, so anything not
    // named .flac goes as wav. The player gets an audio/ type of its own: FileReader's may be empty for FLAC.
    hold(name, url) {
      const format = /\.flac$/i.test(name) ? "flac" : "wav";
      const data = url.slice(url.indexOf(",") + 1);
      return { name, format, data, url: `data:audio/${format};base64,${data}` };
    },
    part: (a) => ({ type: "input_audio", input_audio: { data: a.data, format: a.format } }),
    show(a) {
      const clip = document.createElement("figure");
      const name = document.createElement("figcaption");
      name.textContent = a.name;
      const player = document.createElement("audio");
      player.controls = true;
      player.src = a.url;
      player.setAttribute("aria-label", `attached audio ${a.name}`);
      clip.append(name, player);
      return clip;
    },
  },
};

// --- the API key, asked once per tab ----------------------------------------------------------------------------
function askKey(reason) {
  const dialog = $("key-dialog");
  if (reason) $("key-reason").textContent = reason;
  chat.asking ||= new Promise((resolve) => { // one dialog, however many requests wait on it
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, $("key").value.trim());
      $("key").value = "";
      chat.asking = null;
      dialog.close();
      resolve();
    };
    dialog.showModal();
  });
  return chat.asking;
}

async function api(path, init = {}) {
  if (chat.needsKey && !sessionStorage.getItem(KEY)) await askKey();
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...init, headers });
  if (response.status !== 401) return response;
  sessionStorage.removeItem(KEY);
  chat.needsKey = true;
  await askKey("The server refused that key; try again.");
  return api(path, init);
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// --- statistics -------------------------------------------------------------------------------------------------
const fmt = (x, digits = 2) => (Number.isFinite(x) ? x.toFixed(digits) : "–");

function positionsTable(id, kept, proposed) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...kept.map((k, i) => {
    const rate = proposed ? (proposed[i] ? k / proposed[i] : 0) : NaN;
    const row = document.createElement("tr");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Number.isFinite(rate) ? Math.round(rate * 4) : 0}rem`;
    const cells = [String(i), proposed ? `${k} / ${proposed[i]}` : String(k), Number.isFinite(rate) ? fmt(rate) : "…"];
    for (const text of cells) row.insertCell().textContent = text;
    row.cells[2].prepend(bar);
    return row;
  }));
}

class ReplyStats {
  constructor() {
    this.tokens = 0;
    this.ownTokens = 0; // produced by the target itself (one per target step)
    this.kept = [];
    this.t0 = performance.now();
    this.tFirst = this.tLast = null;
  }

  add(draft) {
    const now = performance.now();
    if (this.tFirst === null) this.tFirst = now;
    this.tLast = now;
    for (const d of draft) {
      this.tokens += 1;
      if (d === null) this.ownTokens += 1;
      else this.kept[d] = (this.kept[d] || 0) + 1;
    }
  }

  show(usage) {
    const kept = Array.from(this.kept, (k) => k || 0);
    const seconds = (this.tLast - this.tFirst) / 1000;
    $("reply-tps").textContent = this.tokens > 1 && seconds > 0 ? fmt((this.tokens - 1) / seconds, 1) : "–";
    $("reply-tpr").textContent = this.ownTokens ? fmt(this.tokens / this.ownTokens) : "–";
    if (!usage) {
      $("reply-kept").textContent = `${kept.reduce((a, b) => a + b, 0)} / …`;
      positionsTable("reply-positions", kept, null);
      return;
    }
    const mtp = usage.mtp;
    const drafting = mtp.proposed_by_position[0] || 0; // rounds that drafted at all
    $("reply-k").textContent = drafting ? fmt(mtp.proposed / drafting) : "off";
    $("reply-kept").textContent = `${mtp.accepted} / ${mtp.proposed}`;
    positionsTable("reply-positions", mtp.accepted_by_position, mtp.proposed_by_position);
  }
}

function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    values[line.slice(0, space).replace(METRIC, "")] = Number(line.slice(space + 1));
  }
  return values;
}

function byPosition(values, name) {
  const out = [];
  for (let i = 0; `${name}{position="${i}"}` in values; i++) out.push(values[`${name}{position="${i}"}`]);
  return out;
}

let previous = null; // the last /metrics sample: the draft length now is the change since it

async function pollMetrics() {
  try {
    const response = await api("metrics");
    if (!response.ok) throw new Error(await errorMessage(response));
    const m = parseMetrics(await response.text());
    $("server-tps").textContent = fmt(m.tokens_per_second, 1);
    $("server-tpr").textContent = m.verify_rounds_total ? fmt(1 + m.draft_accepted_total / m.verify_rounds_total) : "–";
    $("server-busy").textContent = `${m.slots_busy} / ${m.slots} (queued ${m.queue_depth})`;
    const first = 'draft_proposed_by_position_total{position="0"}';
    if (previous && m[first] > previous[first]) {
      $("server-k").textContent = fmt((m.draft_proposed_total - previous.draft_proposed_total) / (m[first] - previous[first]));
    } else if (previous && m.slots_busy === 0) {
      $("server-k").textContent = "idle";
    }
    previous = m;
    positionsTable("server-positions", byPosition(m, "draft_accepted_by_position_total"),
                   byPosition(m, "draft_proposed_by_position_total"));
  } catch (e) {
    $("server-tps").textContent = "unavailable";
  }
  setTimeout(pollMetrics, POLL_MS);
}

// --- the conversation -------------------------------------------------------------------------------------------
function addMessage(role, text, attached = []) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : chat.model || "assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  for (const [kind, a] of attached) item.append(ATTACHMENTS[kind].show(a));
  $("log").append(item);
  toEnd();
  return item;
}

// Keep the newest text in view while it streams, unless the reader scrolled up to read something else.
function toEnd() {
  if (chat.pinned) $("log").scrollTop = $("log").scrollHeight;
}

function draftSetting() {
  const mode = document.querySelector('input[name="draft"]:checked').value;
  return mode === "fixed" ? { max: Number($("draft-k").value) } : mode;
}

function requestBody() {
  const system = $("system").value.trim();
  const body = {
    model: chat.model,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...chat.history],
    stream: true,
    stream_options: { include_usage: true },
    draft: draftSetting(),
    chat_template_kwargs: { enable_thinking: $("think").checked },
  };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  return body;
}

// One assistant message as it streams: thoughts (folded away) and the answer, one span per chunk.
class Reply {
  constructor() {
    this.item = addMessage("assistant", "");
    this.item.setAttribute("aria-busy", "true");
    this.text = this.item.querySelector(".text");
    this.answer = "";
    this.thoughts = null;
    this.stats = new ReplyStats();
  }

  chunk(event) {
    const delta = event.choices.length ? event.choices[0].delta : {};
    const draft = event.mtp ? event.mtp.draft : [];
    this.stats.add(draft);
    if (delta.reasoning_content) this.thought(delta.reasoning_content);
    if (delta.content) {
      const span = document.createElement("span");
      span.textContent = delta.content;
      const kept = draft.filter((d) => d !== null);
      if (kept.length) {
        span.className = "kept";
        span.dataset.draft = kept.join(",");
        span.title = `kept draft (position ${kept.join(", ")})`;
      }
      this.text.append(span);
      this.answer += delta.content;
    }
    if (event.usage) this.usage = event.usage;
  }

  paint() {
    this.stats.show(this.usage);
    toEnd();
  }

  thought(text) {
    if (!this.thoughts) {
      const details = document.createElement("details");
      details.innerHTML = "<summary>Thinking</summary>";
      this.thoughts = document.createElement("div");
      this.thoughts.className = "text thoughts";
      details.append(this.thoughts);
      this.text.before(details);
    }
    this.thoughts.append(text);
  }

  end(state, message) {
    this.item.dataset.state = state;
    this.item.setAttribute("aria-busy", "false");
    if (message) {
      const note = document.createElement("p");
      note.className = state === "error" ? "status error" : "status";
      if (state === "error") note.setAttribute("role", "alert");
      note.textContent = message;
      this.item.append(note);
    }
    this.paint();
  }
}

const nextTask = () => new Promise((resolve) => setTimeout(resolve, 0));

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: ?/, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  const attached = Object.keys(ATTACHMENTS).filter((kind) => chat.attached[kind])
    .map((kind) => [kind, chat.attached[kind]]);
  const parts = attached.map(([kind, a]) => ATTACHMENTS[kind].part(a));
  chat.history.push({ role: "user", content: parts.length ? [{ type: "text", text }, ...parts] : text });
  addMessage("user", text, attached);
  for (const kind in ATTACHMENTS) detach(kind);
  const reply = new Reply();
  chat.controller = new AbortController();
  busy(true);
  try {
    const response = await api("v1/chat/completions", { method: "POST", body: JSON.stringify(requestBody()),
                                                        signal: chat.controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    let painted = performance.now();
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      reply.chunk(event);
      if (performance.now() - painted > PAINT_MS) { // buffered chunks arrive as microtasks: let the page breathe
        reply.paint();
        await nextTask();
        painted = performance.now();
      }
    }
    chat.history.push({ role: "assistant", content: reply.answer });
    reply.end("done");
  } catch (e) {
    if (e.name === "AbortError") {
      chat.history.push({ role: "assistant", content: reply.answer });
      reply.end("stopped", "stopped");
    } else {
      chat.history.pop(); // the turn failed: it is not part of the conversation
      reply.end("error", e.message);
    }
  } finally {
    chat.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function attach(kind) {
  const file = $(kind).files[0];
  if (!file) return detach(kind);
  const reader = new FileReader();
  reader.onload = () => {
    chat.attached[kind] = ATTACHMENTS[kind].hold(file.name, reader.result);
    $(`${kind}-name`).textContent = file.name;
    $(`${kind}-attachment`).hidden = false;
  };
  reader.readAsDataURL(file);
}

function detach(kind) {
  chat.attached[kind] = null;
  $(kind).value = ""; // so choosing the same file again is a change
  $(`${kind}-attachment`).hidden = true;
}

function newChat() {
  if (chat.controller) chat.controller.abort();
  chat.history = [];
  $("log").replaceChildren();
  for (const id of ["reply-tps", "reply-tpr", "reply-k", "reply-kept"]) $(id).textContent = "–";
  $("reply-positions").tBodies[0].replaceChildren();
  $("prompt").focus();
}

// --- wiring -----------------------------------------------------------------------------------------------------
async function start() {
  chat.needsKey = document.body.dataset.auth === "bearer";
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.controller || !chat.model) return;
    $("prompt").value = "";
    send(text);
  });
  $("log").addEventListener("scroll", () => {
    const log = $("log");
    chat.pinned = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  for (const kind in ATTACHMENTS) {
    $(kind).addEventListener("change", () => attach(kind));
    $(`remove-${kind}`).addEventListener("click", () => detach(kind));
  }
  for (const radio of document.querySelectorAll('input[name="draft"]')) {
    radio.addEventListener("change", () => { $("draft-k").disabled = typeof draftSetting() !== "object"; });
  }
  const response = await api("v1/models");
  if (!response.ok) {
    $("model").textContent = `cannot list models: ${await errorMessage(response)}`;
    return;
  }
  chat.model = (await response.json()).data[0].id;
  $("model").textContent = chat.model;
  pollMetrics();
}

start();
