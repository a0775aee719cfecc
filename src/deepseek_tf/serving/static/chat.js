// The chat page of `deepseek-tf serve`: streams replies from POST /v1/chat/completions
// (fetch + a ReadableStream of server-sent events), keeps the conversation, shows the speed
// live and colours each token by the model's uncertainty (its entropy, from `logprobs`).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // [{role, content}] sent with every request
let controller = null; // the AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error.message || JSON.stringify(body.error);
  } catch (e) { /* not JSON */ }
  return `the server answered ${response.status}`;
}

// -- server status ------------------------------------------------------------------------
async function checkServer() {
  const status = $("server-status");
  try {
    const health = await (await fetch("/health")).json();
    const ok = health.status === "ok";
    status.textContent = ok ? `ready · context ${health.context} tokens` : health.status;
    status.className = "status " + (ok ? "ok" : "loading");
    if (!ok) setTimeout(checkServer, 2000);
  } catch (e) {
    status.textContent = "server unreachable";
    status.className = "status down";
  }
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model-name").textContent = "model: (enter the API key)";
      return;
    }
    const models = await response.json();
    $("model-name").textContent = "model: " + models.data[0].id;
  } catch (e) { /* the status line already says so */ }
}

// -- messages -----------------------------------------------------------------------------
function addMessage(role, text) {
  $("empty-note").hidden = true;
  const item = document.createElement("article");
  item.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(label, content);
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function uncertaintyClass(entry) {
  if (typeof entry.entropy === "number") {
    const h = entry.entropy;
    return h < 0.5 ? "u0" : h < 1.5 ? "u1" : h < 3 ? "u2" : "u3";
  }
  const p = Math.exp(entry.logprob);
  return p >= 0.8 ? "u0" : p >= 0.5 ? "u1" : p >= 0.2 ? "u2" : "u3";
}

function tooltip(entry) {
  const p = Math.exp(entry.logprob);
  let text = `${JSON.stringify(entry.token)}  p = ${p.toFixed(3)}`;
  if (typeof entry.entropy === "number") text += `  entropy ${entry.entropy.toFixed(2)} nats`;
  const alts = (entry.top_logprobs || []).filter((a) => a.token !== entry.token);
  if (alts.length) {
    text += "\nalternatives: " + alts
      .map((a) => `${JSON.stringify(a.token)} ${Math.exp(a.logprob).toFixed(3)}`).join(", ");
  }
  return text;
}

// One assistant reply: the streamed text is the truth; tokens with logprobs are laid over it
// as coloured spans while their text matches, the rest is plain text.
class Reply {
  constructor() {
    this.item = addMessage("assistant", "");
    this.box = this.item.querySelector(".content");
    this.box.classList.toggle("colour", $("show-uncertainty").checked);
    this.text = "";
    this.shown = 0; // characters of `text` already on the page
    this.pending = []; // logprob entries not yet on the page
    this.tokens = 0;
    this.updates = 0;
    this.setState("streaming");
  }

  setState(state) {
    this.item.dataset.state = state;
    this.item.setAttribute("aria-busy", String(state === "streaming"));
  }

  add(text, entries) {
    this.text += text;
    this.tokens += entries.length;
    this.pending.push(...entries);
    this.updates += 1;
    this.item.dataset.updates = String(this.updates);
    this.render(false);
  }

  render(final) {
    while (this.pending.length) {
      const entry = this.pending[0];
      const rest = this.text.slice(this.shown);
      if (!entry.token) {
        this.pending.shift(); // no text of its own
      } else if (rest.startsWith(entry.token)) {
        const span = document.createElement("span");
        span.className = "tok " + uncertaintyClass(entry);
        span.title = tooltip(entry);
        span.tabIndex = 0;
        span.textContent = entry.token;
        this.box.append(span);
        this.shown += entry.token.length;
        this.pending.shift();
      } else if (!final && entry.token.startsWith(rest)) {
        break; // the server holds its text back for now (a stop string may start here)
      } else {
        this.pending = []; // out of step (a stop string cut a token): plain text from here
      }
    }
    const rest = this.text.slice(this.shown);
    if (rest && (final || !this.pending.length)) {
      this.box.append(document.createTextNode(rest));
      this.shown = this.text.length;
    }
    this.box.scrollIntoView({ block: "end" });
  }

  note(text) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = text;
    this.item.append(note);
  }
}

// -- streaming ------------------------------------------------------------------------------
function requestBody() {
  const body = {
    messages: [...conversation],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    logprobs: true,
    top_logprobs: $("show-uncertainty").checked ? 3 : 0,
  };
  const system = $("system-prompt").value.trim();
  if (system) body.messages.unshift({ role: "system", content: system });
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

function showSpeed(reply, firstAt) {
  if (firstAt === null) return;
  const seconds = (performance.now() - firstAt) / 1000;
  $("token-count").textContent = String(reply.tokens);
  if (seconds > 0 && reply.tokens > 1) $("rate").textContent = ((reply.tokens - 1) / seconds).toFixed(1);
}

async function stream(reply) {
  const started = performance.now();
  let firstAt = null;
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
    signal: controller.signal,
  });
  if (!response.ok) {
    if (response.status === 401) $("api-key").focus();
    throw new Error(await errorText(response));
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.timings) showTimings(chunk.timings);
        const choice = (chunk.choices || [])[0];
        if (!choice) continue;
        const text = (choice.delta && choice.delta.content) || "";
        const entries = (choice.logprobs && choice.logprobs.content) || [];
        if (text || entries.length) {
          if (firstAt === null) {
            firstAt = performance.now();
            $("ttft").textContent = `${Math.round(firstAt - started)} ms`;
          }
          reply.add(text, entries);
          showSpeed(reply, firstAt);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return finish;
}

function showTimings(t) {
  if (typeof t.tokens_per_second === "number") $("rate").textContent = t.tokens_per_second.toFixed(1);
  if (typeof t.ttft_ms === "number") $("ttft").textContent = `${Math.round(t.ttft_ms)} ms`;
  if (typeof t.completion_tokens === "number") $("token-count").textContent = String(t.completion_tokens);
}

async function send(text) {
  showError("");
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = new Reply();
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  for (const id of ["rate", "token-count", "ttft"]) $(id).textContent = "–";
  try {
    const finish = await stream(reply);
    reply.render(true);
    reply.setState("done");
    if (finish === "length") reply.note("(stopped at the token limit)");
  } catch (e) {
    reply.render(true);
    if (e.name === "AbortError") {
      reply.setState("stopped");
      reply.note("(stopped)");
    } else {
      reply.setState("error");
      showError(e.message);
    }
  } finally {
    if (reply.text) conversation.push({ role: "assistant", content: reply.text });
    else if (reply.item.dataset.state === "error") conversation.pop(); // the turn failed
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("message-input").focus();
  }
}

function init() {
  const key = sessionStorage.getItem("deepseek-tf-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("deepseek-tf-api-key", $("api-key").value.trim());
    checkServer();
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  });
  $("show-uncertainty").addEventListener("change", () => {
    for (const box of document.querySelectorAll(".msg.assistant .content")) {
      box.classList.toggle("colour", $("show-uncertainty").checked);
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message-input").value.trim();
    if (!text || controller) return;
    $("message-input").value = "";
    send(text);
  });
  $("message-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation.length = 0;
    for (const item of document.querySelectorAll(".msg")) item.remove();
    $("empty-note").hidden = false;
    showError("");
  });
  checkServer();
}

document.addEventListener("DOMContentLoaded", init);
