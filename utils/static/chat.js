// Chat page logic: send the conversation to /v1/chat/completions with stream: true and show
// the answer as its server-sent chunks arrive. Model text is inserted with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const messagesEl = $("messages"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
const keyInput = $("api-key");
const history = [];  // [{role, content}] in OpenAI's format
let controller = null;  // AbortController of the answer being streamed

keyInput.value = localStorage.getItem("chatlm-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("chatlm-api-key", keyInput.value.trim()));

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;
  messagesEl.appendChild(el);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return el;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || body.detail || resp.statusText;
  } catch (e) {
    return resp.statusText || ("HTTP " + resp.status);
  }
}

// Reads an SSE body; calls onData(json) for each `data:` event until `data: [DONE]`.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  addMessage("user", text);
  history.push({ role: "user", content: text });
  const answerEl = addMessage("assistant", "");
  answerEl.dataset.done = "false";
  answerEl.dataset.chunks = "0";
  controller = new AbortController();
  sendBtn.disabled = true;
  stopBtn.hidden = false;
  const headers = { "Content-Type": "application/json" };
  const key = keyInput.value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({ messages: history, stream: true }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (obj) => {
      if (obj.error) throw new Error(obj.error.message);
      const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
      if (delta && delta.content) {
        answerEl.textContent += delta.content;
        answerEl.dataset.chunks = String(Number(answerEl.dataset.chunks) + 1);
        messagesEl.scrollTop = messagesEl.scrollHeight;
      }
    });
    history.push({ role: "assistant", content: answerEl.textContent });
  } catch (err) {
    if (err.name !== "AbortError") addMessage("error", "出错了：" + err.message);
    history.push({ role: "assistant", content: answerEl.textContent });
  } finally {
    answerEl.dataset.done = "true";
    controller = null;
    sendBtn.disabled = false;
    stopBtn.hidden = true;
    input.focus();
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
stopBtn.addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; messagesEl.replaceChildren(); });
