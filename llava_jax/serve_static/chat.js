// The chat page's logic: the conversation is kept here and sent whole each turn to the server's
// OpenAI-compatible /v1/chat/completions (images and videos as data: URL parts in the user turn they came with);
// the answer is streamed (server-sent events read from fetch's body, since EventSource cannot POST) and
// shown token by token. Model output only ever reaches the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "llava_jax.api_key";

const chat = {
  turns: [], // {role: "user" | "assistant", text, image: data URL | null, element}
  pendingImage: null, // {url, name}: attached to the next user turn
  controller: null, // the AbortController of the request in flight, null when idle
};

// What tests/test_serve_browser.py reads: the last request body and how many content deltas the
// last answer arrived in (a streamed answer arrives in several).
window.__llava = { lastRequest: null, chunks: 0 };

/** A failure the user should read as is (the server's error message, or a bad setting). */
class ChatError extends Error {}

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = state;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

/** The message of a failed response: the server's `{"error": {"message"}}` when it sent one. */
async function responseError(response) {
  const body = await response.text();
  let message = "";
  try {
    const parsed = JSON.parse(body);
    message = (parsed.error && (parsed.error.message || parsed.error)) || parsed.detail || "";
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch (_) {
    message = body.slice(0, 500);
  }
  const hint = response.status === 401 ? " (enter the server's API key under Access)" : "";
  return new ChatError(`${message || response.statusText} [HTTP ${response.status}]${hint}`);
}

/** What to tell the user about a failure. */
function readable(e) {
  if (e instanceof ChatError) return e.message;
  // fetch fails with a TypeError when the server cannot be reached at all.
  if (e instanceof TypeError) return `could not reach the server (${e.message})`;
  return `${e.name}: ${e.message}`;
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw await responseError(response);
    const models = (await response.json()).data || [];
    select.replaceChildren(
      ...models.map((m) => {
        const option = document.createElement("option");
        option.value = option.textContent = m.id;
        return option;
      })
    );
    if (models.some((m) => m.id === previous)) select.value = previous;
    if (chat.controller) return; // an answer is streaming: the status line is its
    setStatus(models.length ? "Ready" : "The server lists no model", models.length ? "ready" : "error");
  } catch (e) {
    if (!chat.controller) setStatus("Could not list the models: " + readable(e), "error");
  }
}

// --- Images -----------------------------------------------------------------------------------------

/** Whether an attachment (a data: URL) is a video: it goes as a video_url part, and shows as a video. */
function isVideo(url) {
  return url.startsWith("data:video/");
}

function attachImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && !file.type.startsWith("video/")) {
    setStatus(`${file.name} is not an image or a video (${file.type || "unknown type"})`, "error");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => setPendingImage(reader.result, file.name);
  reader.onerror = () => setStatus(`Could not read ${file.name}`, "error");
  reader.readAsDataURL(file);
}

function setPendingImage(url, name) {
  chat.pendingImage = { url, name };
  const [shown, other] = isVideo(url) ? ["video-thumb", "image-thumb"] : ["image-thumb", "video-thumb"];
  $(shown).src = url;
  $(shown).hidden = false;
  $(other).hidden = true;
  $(other).removeAttribute("src");
  $("image-name").textContent = name;
  $("image-preview").hidden = false;
}

function removeImage() {
  chat.pendingImage = null;
  $("image-preview").hidden = true;
  $("image-thumb").removeAttribute("src");
  $("video-thumb").removeAttribute("src");
  $("image-name").textContent = "";
  $("image-input").value = "";
}

function firstImage(files) {
  const media = (f) => f.type.startsWith("image/") || f.type.startsWith("video/");
  return Array.from(files || []).find(media) || (files && files[0]);
}

// --- Messages ---------------------------------------------------------------------------------------

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

/** A message element: its optional image (or video), then its text (as text, never as HTML). */
function addMessage(role, text, image) {
  const element = document.createElement("div");
  element.className = "message " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = { user: "You", assistant: "LLaVA", error: "Error" }[role];
  element.append(who);
  if (image && isVideo(image)) {
    const video = document.createElement("video");
    video.src = image;
    video.controls = video.muted = true;
    video.setAttribute("aria-label", "Video sent with this message");
    element.append(video);
  } else if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "Image sent with this message";
    element.append(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  element.append(body);
  if (role === "error") element.setAttribute("role", "alert");
  $("messages").append(element);
  scrollToEnd();
  return element;
}

function showError(message) {
  addMessage("error", message, null);
}

/** Errors are shown, never sent: they go when the user asks again. */
function dropErrors() {
  document.querySelectorAll("#messages .message.error").forEach((e) => e.remove());
}

// --- Settings ---------------------------------------------------------------------------------------

function numberSetting(id, name, { min, max, integer, optional }) {
  const raw = $(id).value.trim();
  if (raw === "" && optional) return undefined;
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value)) throw new ChatError(`${name} must be a number, not "${raw}"`);
  if (integer && !Number.isInteger(value)) throw new ChatError(`${name} must be a whole number, not ${raw}`);
  if (value < min || (max !== undefined && value > max)) {
    throw new ChatError(`${name} must be ${max === undefined ? "at least " + min : `between ${min} and ${max}`}`);
  }
  return value;
}

/** The sampling parameters of the request, checked; a ChatError names the setting that is wrong. */
function readParams() {
  const params = {
    temperature: numberSetting("temperature", "Temperature", { min: 0, max: 2 }),
    top_p: numberSetting("top-p", "Top-p", { min: 0, max: 1 }),
    max_tokens: numberSetting("max-tokens", "Max output tokens", { min: 1, integer: true }),
  };
  const seed = numberSetting("seed", "Seed", { min: 0, integer: true, optional: true });
  if (seed !== undefined) params.seed = seed;
  const stop = $("stop")
    .value.split("\n")
    .filter((s) => s !== "")
    .map((s) => s.replaceAll("\\n", "\n"));
  if (stop.length) params.stop = stop;
  return params;
}

/** The conversation in OpenAI's schema: a user turn with an image is [image part, text part]; with a video,
 * [video part (vLLM's video_url), text part]. */
function apiMessages() {
  return chat.turns.map((turn) => {
    if (turn.role === "assistant" || !turn.image) return { role: turn.role, content: turn.text };
    const content = [isVideo(turn.image) ? { type: "video_url", video_url: { url: turn.image } }
      : { type: "image_url", image_url: { url: turn.image } }];
    if (turn.text) content.push({ type: "text", text: turn.text });
    return { role: "user", content };
  });
}

// --- Streaming --------------------------------------------------------------------------------------

/** The `data:` payloads of the server-sent events in a fetch body (any of \n, \r\n, \r ends a line). */
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let carry = ""; // a trailing \r, which may be the first half of \r\n
  let text = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const raw = carry + (done ? decoder.decode() : decoder.decode(value, { stream: true }));
      const cut = !done && raw.endsWith("\r") ? raw.length - 1 : raw.length;
      carry = raw.slice(cut);
      text += raw.slice(0, cut).replace(/\r\n?/g, "\n");
      let end;
      while ((end = text.indexOf("\n\n")) >= 0) {
        const block = text.slice(0, end);
        text = text.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""));
        if (data.length) yield data.join("\n");
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {}); // stopped early (at [DONE], on an error): close the body
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("abort").disabled = !busy;
  $("regenerate").disabled = busy || chat.turns.length === 0;
  $("messages").setAttribute("aria-busy", String(busy));
}

/** Ask for the next assistant turn with the whole conversation so far, and stream it into the page. */
async function ask(params) {
  const body = { messages: apiMessages(), stream: true, ...params };
  if ($("model").value) body.model = $("model").value;
  window.__llava.lastRequest = body;
  window.__llava.chunks = 0;

  const turn = { role: "assistant", text: "", image: null, element: addMessage("assistant", "", null) };
  turn.element.dataset.state = "streaming";
  const textElement = turn.element.querySelector(".text");
  chat.turns.push(turn);
  const controller = (chat.controller = new AbortController());
  setBusy(true);
  setStatus("Generating…", "streaming");
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await responseError(response);
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") {
        finish = finish || "stop";
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ChatError(chunk.error.message || JSON.stringify(chunk.error));
      const choice = (chunk.choices || [])[0] || {};
      const delta = (choice.delta && choice.delta.content) || "";
      if (delta) {
        turn.text += delta;
        textElement.textContent = turn.text;
        window.__llava.chunks += 1;
        scrollToEnd();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (!finish) throw new ChatError("the answer's stream ended before it was complete");
    turn.element.dataset.state = "done";
    const why = finish === "length" ? " (the max output tokens were reached)" : "";
    setStatus("Done" + why, "done");
  } catch (e) {
    const stopped = e.name === "AbortError";
    turn.element.dataset.state = stopped ? "stopped" : "error";
    if (chat.controller !== controller) return; // cleared meanwhile: this conversation is gone
    if (!turn.text) {
      // Nothing came. The question goes back to the composer, to be sent again as it is or edited: the
      // conversation keeps alternating user / assistant, as the chat templates require.
      turn.element.remove();
      chat.turns.pop();
      const question = chat.turns.pop();
      question.element.remove();
      if (!$("prompt").value) $("prompt").value = question.text;
      if (question.image && !chat.pendingImage) setPendingImage(question.image, "image of the unanswered message");
    }
    if (stopped) {
      setStatus("Stopped", "stopped");
    } else {
      const message = readable(e);
      showError(message);
      setStatus("Error: " + message, "error");
    }
  } finally {
    if (chat.controller === controller) {
      chat.controller = null;
      setBusy(false);
    }
  }
}

// --- Actions ----------------------------------------------------------------------------------------

// The settings as request fields, or null after showing what is wrong with them (nothing is sent then).
function paramsOrShow() {
  try {
    return readParams();
  } catch (e) {
    setStatus(e.message, "error");
    return null;
  }
}

function send() {
  if (chat.controller) return;
  const text = $("prompt").value;
  if (!text.trim() && !chat.pendingImage) return;
  const params = paramsOrShow();
  if (!params) return;
  dropErrors();
  const image = chat.pendingImage ? chat.pendingImage.url : null;
  chat.turns.push({ role: "user", text, image, element: addMessage("user", text, image) });
  $("prompt").value = "";
  removeImage();
  ask(params);
}

function regenerate() {
  if (chat.controller || chat.turns.length === 0) return;
  const params = paramsOrShow();
  if (!params) return;
  dropErrors();
  const last = chat.turns[chat.turns.length - 1];
  if (last.role === "assistant") {
    chat.turns.pop();
    last.element.remove();
  }
  ask(params);
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

function clear() {
  stop();
  chat.controller = null;
  chat.turns = [];
  $("messages").replaceChildren();
  removeImage();
  setBusy(false);
  setStatus("Ready", "ready");
}

// --- Wiring -----------------------------------------------------------------------------------------

function init() {
  try {
    $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    // Storage refused (a private window's policy): the key is simply not remembered.
  }
  $("api-key").addEventListener("change", () => {
    try {
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    } catch (_) {}
    loadModels();
  });

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("abort").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clear);

  $("image-input").addEventListener("change", (e) => attachImage(e.target.files[0]));
  $("image-remove").addEventListener("click", removeImage);
  $("prompt").addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.files);
    if (file && file.type.startsWith("image/")) {
      e.preventDefault();
      attachImage(file);
    }
  });
  // A file dropped anywhere on the page is attached (the browser would otherwise navigate to it).
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    document.body.classList.remove("dragging");
    attachImage(firstImage(e.dataTransfer.files));
  });

  setBusy(false);
  loadModels();
  $("prompt").focus();
}

init();
