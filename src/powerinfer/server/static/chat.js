// powerinfer's chat page: streams /v1/chat/completions (SSE parsed by hand: EventSource cannot POST) and draws the
// "ffn" extension of each chunk (server/__init__.py): per layer, how many FFN neurons computed that token.
// Model output is untrusted: it is HTML-escaped before the small markdown subset below adds any tag.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "powerinfer.chat.v1";
const SETTINGS = ["system", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "seed"];

const state = { messages: [], settings: {}, controller: null, props: null, ffn: [], nFF: 0, nLayer: 0 };

// -- storage ------------------------------------------------------------------------------------------------------
function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    state.messages = Array.isArray(saved.messages) ? saved.messages : [];
    state.settings = saved.settings || {};
  } catch (e) { state.messages = []; state.settings = {}; }
  for (const k of SETTINGS) if (state.settings[k] !== undefined) $(k).value = state.settings[k];
  $("api_key").value = sessionStorage.getItem(STORE + ".key") || "";
}

function save() {
  for (const k of SETTINGS) state.settings[k] = $(k).value;
  localStorage.setItem(STORE, JSON.stringify({ messages: state.messages, settings: state.settings }));
  sessionStorage.setItem(STORE + ".key", $("api_key").value);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// -- rendering ----------------------------------------------------------------------------------------------------
function escapeHTML(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Fenced code blocks, inline code and bold, applied to text that is already escaped: the only tags in the result
// are the ones written here. Links and images are left as text (no remote loads from model output).
function renderMarkdown(text) {
  const parts = escapeHTML(text).split("```");
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const body = part.replace(/^[\w+.-]*\n/, "");
      return "<pre><code>" + body + "</code></pre>";
    }
    return part.replace(/`([^`\n]+)`/g, "<code>$1</code>").replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  }).join("");
}

function addBubble(role, text, extra) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.setAttribute("aria-label", role === "user" ? "User message" : "Assistant message");
  const body = document.createElement("div");
  body.className = "body";
  div.appendChild(body);
  setBubbleText(div, role, text);
  if (extra && extra.stats) setStats(div, extra.stats);
  if (extra && extra.error) setError(div, extra.error);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBubbleText(div, role, text) {
  const body = div.querySelector(".body");
  if (role === "assistant") body.innerHTML = renderMarkdown(text);
  else body.textContent = text;
}

function setStats(div, text) {
  let s = div.querySelector(".stats");
  if (!s) { s = document.createElement("span"); s.className = "stats"; div.appendChild(s); }
  s.textContent = text;
}

function setError(div, text) {
  let e = div.querySelector(".error");
  if (!e) { e = document.createElement("div"); e.className = "error"; div.appendChild(e); }
  e.textContent = text;
}

function renderHistory() {
  $("messages").textContent = "";
  for (const m of state.messages) addBubble(m.role, m.content, m);
}

// -- the sparsity view --------------------------------------------------------------------------------------------
const RAMP = [[16, 19, 26], [59, 47, 122], [184, 65, 122], [245, 154, 60], [252, 247, 176]];
function color(f) {
  const x = Math.max(0, Math.min(1, f)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x)), t = x - i;
  const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function resetFFN() {
  state.ffn = [];
  $("ffn").dataset.tokens = "0";
  delete $("ffn").dataset.last;
  drawFFN();
}

function pushFFN(ffn) {
  state.nFF = ffn.n_ff;
  if (ffn.neurons) state.nLayer = ffn.neurons.length;
  state.ffn.push(ffn);
  const sec = $("ffn");
  sec.dataset.tokens = String(state.ffn.length);
  if (ffn.neurons) sec.dataset.last = ffn.neurons.join(",");
  drawFFN();
}

function drawFFN() {
  const map = $("ffn-map"), bars = $("ffn-bars");
  const mctx = map.getContext("2d"), bctx = bars.getContext("2d");
  mctx.fillStyle = "#10131a"; mctx.fillRect(0, 0, map.width, map.height);
  bctx.fillStyle = "#10131a"; bctx.fillRect(0, 0, bars.width, bars.height);
  const rows = state.ffn.filter((f) => f.neurons);
  if (!rows.length || !state.nLayer) return;
  const L = state.nLayer, nFF = state.nFF;
  // heat map: one column per token (newest on the right), one row per layer (layer 0 at the top)
  const cw = Math.max(2, Math.min(8, Math.floor(map.width / Math.max(rows.length, 40))));
  const shown = rows.slice(-Math.floor(map.width / cw));
  const rh = map.height / L;
  shown.forEach((f, x) => {
    f.neurons.forEach((n, l) => {
      mctx.fillStyle = color(n / nFF);
      mctx.fillRect(x * cw, Math.floor(l * rh), cw, Math.ceil(rh));
    });
  });
  // bars: the last token, one bar per layer; split hot/cold when a placement reports tiers
  const last = rows[rows.length - 1];
  const bh = bars.height / L, left = 24, width = bars.width - left - 6;
  bctx.font = "10px system-ui"; bctx.textBaseline = "middle";
  for (let l = 0; l < L; l++) {
    const y = l * bh;
    if (l % Math.max(1, Math.ceil(L / 8)) === 0) {
      bctx.fillStyle = "#8a93a6";
      bctx.fillText(String(l), 2, Math.max(6, Math.min(bars.height - 6, y + bh / 2)));
    }
    if (last.hot && last.cold) {
      const wh = width * last.hot[l] / nFF, wc = width * last.cold[l] / nFF;
      bctx.fillStyle = "#f59a3c"; bctx.fillRect(left, y + 1, wh, Math.max(1, bh - 2));
      bctx.fillStyle = "#5b8def"; bctx.fillRect(left + wh, y + 1, wc, Math.max(1, bh - 2));
    } else {
      bctx.fillStyle = color(last.neurons[l] / nFF);
      bctx.fillRect(left, y + 1, Math.max(1, width * last.neurons[l] / nFF), Math.max(1, bh - 2));
    }
  }
  const computed = last.neurons.reduce((a, b) => a + b, 0) / (L * nFF);
  const mean = rows.reduce((a, f) => a + f.sparsity, 0) / rows.length;
  $("ffn-summary").textContent =
    `Token ${rows.length}: ${(100 * computed).toFixed(1)}% of ${L} × ${nFF} FFN neurons computed ` +
    `(${(100 * last.sparsity).toFixed(1)}% skipped, ${(last.bytes / 1048576).toFixed(2)} MiB of FFN weights read). ` +
    `Mean over this reply: ${(100 * mean).toFixed(1)}% skipped.`;
  const tiers = $("ffn-tiers");
  tiers.hidden = !(last.hot && last.cold);
  if (!tiers.hidden) {
    const hot = last.hot.reduce((a, b) => a + b, 0), cold = last.cold.reduce((a, b) => a + b, 0);
    tiers.textContent = `Fast tier (orange): ${hot} neurons, CPU tier (blue): ${cold} neurons.`;
  }
}

// -- talking to the server ----------------------------------------------------------------------------------------
function requestBody() {
  const s = (id) => $(id).value.trim();
  const num = (id) => (s(id) === "" ? undefined : Number(s(id)));
  const messages = [];
  if (s("system")) messages.push({ role: "system", content: $("system").value });
  for (const m of state.messages) if (!m.error) messages.push({ role: m.role, content: m.content });
  const body = { model: state.props ? state.props.model_alias : "default", messages, stream: true,
                 stream_options: { include_usage: true }, ffn_per_token: true };
  for (const k of ["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "seed"]) {
    const v = num(k);
    if (v !== undefined && !Number.isNaN(v)) body[k] = v;
  }
  return body;
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    return `HTTP ${resp.status}: ${(j.error && j.error.message) || JSON.stringify(j)}`;
  } catch (e) { return `HTTP ${resp.status} ${resp.statusText}`; }
}

// Server-Sent Events from a fetch body: events end with a blank line; ':' lines are comments (pings).
async function* sse(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (!data.length) continue;
      const text = data.join("\n");
      if (text === "[DONE]") return;
      yield JSON.parse(text);
    }
  }
}

async function send(text) {
  save();
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const entry = { role: "assistant", content: "" };
  resetFFN();
  setBusy(true);
  const controller = new AbortController();
  state.controller = controller;
  const t0 = performance.now();
  let tFirst = null, nTokens = 0, finish = null, timings = null, usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                         body: JSON.stringify(requestBody()), signal: controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sse(resp)) {
      if (chunk.error) throw new Error(chunk.error.message || "server error");
      if (chunk.usage) usage = chunk.usage;
      if (chunk.ffn) pushFFN(chunk.ffn);
      if (chunk.timings) timings = chunk.timings;
      for (const c of chunk.choices || []) {
        const piece = c.delta && c.delta.content;
        if (piece) {
          if (tFirst === null) tFirst = performance.now();
          entry.content += piece;
          setBubbleText(bubble, "assistant", entry.content);
          bubble.scrollIntoView({ block: "end" });
        }
        if (c.delta && c.delta.content !== undefined && !c.delta.role) nTokens++;
        if (c.finish_reason) finish = c.finish_reason;
        if (tFirst !== null && !finish) {
          const s = (performance.now() - tFirst) / 1000;
          setStats(bubble, `${nTokens} tokens · ${s > 0 ? (nTokens / s).toFixed(1) : "–"} tok/s`);
        }
      }
    }
    const gen = usage ? usage.completion_tokens : nTokens;
    const rate = timings ? timings.predicted_per_second : nTokens / ((performance.now() - (tFirst || t0)) / 1000);
    const prompt = usage ? ` · prompt ${usage.prompt_tokens} tokens (${usage.prompt_tokens_details.cached_tokens} cached)` : "";
    entry.stats = `${gen} tokens · ${rate.toFixed(1)} tok/s${prompt} · ${finish || "?"}`;
  } catch (e) {
    if (e.name === "AbortError") {
      entry.stats = `stopped after ${nTokens} tokens`;
    } else {
      entry.error = String(e.message || e);
      setError(bubble, entry.error);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    if (entry.stats) setStats(bubble, entry.stats);
    if (entry.content || !entry.error) state.messages.push(entry);
    else state.messages.pop();  // a failed turn: keep the user's text in the box to retry
    if (entry.error && !entry.content) $("input").value = text;
    save();
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
  if (!busy) $("input").focus();
}

async function connect() {
  try {
    const resp = await fetch("/props", { headers: headers() });
    if (resp.status === 401) {
      $("model").textContent = "this server needs an API key (Settings)";
      return;
    }
    if (resp.status === 503) { $("model").textContent = "loading the model…"; setTimeout(connect, 1000); return; }
    if (!resp.ok) throw new Error(await errorText(resp));
    const p = await resp.json();
    state.props = p;
    state.nLayer = p.ffn.n_layer; state.nFF = p.ffn.n_ff;
    $("model").textContent = p.model_alias;
    $("status").textContent = p.ffn.sparse ? `sparse FFN: ${p.ffn.mode.replace(/\s*\(.*\)$/, "")}` : "dense FFN";
    $("status").title = p.ffn.mode;
    if (!p.ffn.sparse) {
      $("ffn-summary").textContent = "This server runs the dense FFN: every neuron of every layer computes for " +
        "every token. Start it with --sparsity auto on a ReLU-family model, or --sparsity 0.5, to see the " +
        "neurons that fire.";
    }
    const d = p.default_generation_settings.params;
    const defaults = { temperature: d.temp, top_k: d.top_k, top_p: d.top_p, min_p: d.min_p,
                       repeat_penalty: d.repeat_penalty, max_tokens: d.n_predict };
    for (const [k, v] of Object.entries(defaults)) if ($(k).value === "") $(k).placeholder = String(v);
  } catch (e) {
    $("model").textContent = "cannot reach the server: " + (e.message || e);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  load();
  renderHistory();
  drawFFN();
  connect();
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    save();
    renderHistory();
    resetFFN();
  });
  for (const k of SETTINGS.concat(["api_key"])) $(k).addEventListener("change", () => { save(); if (k === "api_key") connect(); });
});
