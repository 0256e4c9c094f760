// The scratchlm chat page: streams replies from the server's OpenAI-compatible API and sends
// thumbs up/down and edited answers to /v1/feedback, which keeps them as preference records.
//
// Model output is only ever set as text (Text nodes, textContent, textarea values), never as
// HTML, and the server's Content-Security-Policy allows no inline script: a reply that contains
// markup shows the markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const state = {
    model: null, // the served model's name, from GET /v1/models
    context: null, // its context in tokens (`max_model_len`): prompt plus reply must fit it
    maxTokensTouched: false, // the user moved the Max tokens slider: keep their value
    modelFetches: 0, // numbers each model fetch, so that only the newest one's answer is shown
    turns: [], // the conversation after the system prompt: {role, content} or a reply object
    controller: null, // aborts the reply being streamed
  };

  // ---- settings ---------------------------------------------------------------------------
  const sliders = {
    temperature: { id: "temperature", show: (v) => Number(v).toFixed(2) },
    top_p: { id: "top-p", show: (v) => Number(v).toFixed(2) },
    top_k: { id: "top-k", show: (v) => (Number(v) === 0 ? "off" : String(v)) },
    max_tokens: { id: "max-tokens", show: (v) => String(v) },
  };

  function samplingSettings() {
    const settings = {};
    for (const [name, slider] of Object.entries(sliders)) settings[name] = Number($(slider.id).value);
    if (settings.top_k === 0) delete settings.top_k; // off: not sent, so servers without top_k accept the request
    return settings;
  }

  function headers() {
    const result = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  // ---- talking to the server --------------------------------------------------------------
  // The API's 401 tells an API client which header to send; a page user has a field instead.
  function keyMessage() {
    return $("api-key").value.trim()
      ? "The server refused this API key: correct it in the API key field."
      : "This server needs an API key: enter it in the API key field.";
  }

  async function errorMessage(response) {
    if (response.status === 401) return keyMessage();
    const body = await response.text();
    try {
      const parsed = JSON.parse(body);
      if (parsed && parsed.error && parsed.error.message) return parsed.error.message;
      if (parsed && parsed.detail) return typeof parsed.detail === "string" ? parsed.detail : JSON.stringify(parsed.detail);
    } catch (_) {
      // not JSON: show the text itself
    }
    return `${response.status} ${response.statusText}${body ? `: ${body.slice(0, 500)}` : ""}`;
  }

  // An Error for a refused request; `kind` "api-key" lets a later right key take it away.
  async function apiError(response) {
    const error = new Error(await errorMessage(response));
    if (response.status === 401) error.kind = "api-key";
    return error;
  }

  async function fetchModel() {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw await apiError(response);
    const body = await response.json();
    if (!body.data || !body.data.length) throw new Error("the server lists no model");
    return body.data[0];
  }

  // A model trained here may have a context of only 128 tokens: the slider's range and default
  // follow the served model's context, so the first message fits.
  function fitMaxTokens(context) {
    if (!Number.isInteger(context) || context < 2) return;
    const slider = $("max-tokens");
    slider.max = String(context);
    if (!state.maxTokensTouched) slider.value = String(Math.min(256, Math.floor(context / 2)));
    $("max-tokens-value").textContent = slider.value; // the browser clamps a value above the new max
  }

  async function loadModel() {
    const fetchNumber = ++state.modelFetches;
    const card = await fetchModel();
    if (fetchNumber !== state.modelFetches) return card.id; // the newest fetch sets the page
    state.model = card.id;
    state.context = card.max_model_len;
    $("model-name").textContent = state.model;
    fitMaxTokens(state.context);
    return state.model;
  }

  async function ensureModel() {
    return state.model || loadModel();
  }

  // Ask for the model list with the current key: show the model's name, or what the key needs.
  // Only errors of this kind are replaced or cleared here; a chat error stays until the next message.
  function refreshModel() {
    const ours = () => ["api-key", "model"].includes($("error").dataset.kind);
    const fetchNumber = state.modelFetches + 1; // loadModel's, taken before its first await
    const newest = () => fetchNumber === state.modelFetches;
    loadModel()
      .then(() => {
        if (newest() && ours()) clearError();
      })
      .catch((error) => {
        if (newest() && !state.controller && (ours() || $("error").hidden)) showError(error.message, error.kind || "model");
      });
  }

  async function postChat(body, signal) {
    return fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  }

  // Server-sent events: blocks separated by a blank line; the payload is in `data:` lines.
  // Line breaks may be \n, \r\n or \r; a \r at the end of a chunk waits for the next chunk, which
  // may start with the \n of the same line break.
  async function* sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      buffer = buffer.replace(done ? /\r\n?/g : /\r\n|\r(?!$)/g, "\n");
      if (done) buffer += "\n\n";
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""));
        if (data.length) yield data.join("\n");
      }
      if (done) return;
    }
  }

  // ---- the conversation -------------------------------------------------------------------
  function conversation() {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of state.turns) messages.push({ role: turn.role, content: turn.content });
    return messages;
  }

  function addMessage(role, text) {
    const node = $("message-template").content.firstElementChild.cloneNode(true);
    node.dataset.role = role;
    node.querySelector(".role").textContent = role === "user" ? "You" : "Assistant";
    const textNode = document.createTextNode(text);
    node.querySelector(".text").appendChild(textNode);
    $("messages").appendChild(node);
    scrollToEnd(true);
    return { node, textNode };
  }

  function scrollToEnd(force) {
    const list = $("messages");
    const nearEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    if (force || nearEnd) list.scrollTop = list.scrollHeight;
  }

  function showError(message, kind = "") {
    const box = $("error");
    box.textContent = message;
    box.dataset.kind = kind;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
    $("error").dataset.kind = "";
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
  }

  async function send(text) {
    clearError();
    const user = { role: "user", content: text, ...addMessage("user", text) };
    state.turns.push(user);
    const messages = conversation();
    const sampling = samplingSettings();
    const reply = {
      role: "assistant",
      content: "",
      original: "", // the model's text; `content` becomes the edit, if any, for the turns that follow
      edited: null,
      rating: null,
      id: null,
      finishReason: null,
      stopped: false, // ended by the Stop button
      messagesBefore: messages,
      sampling,
      ...addMessage("assistant", ""),
    };
    reply.node.classList.add("streaming");
    reply.node.setAttribute("aria-busy", "true");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    try {
      const model = await ensureModel();
      let response = await postChat({ model, messages, stream: true, ...sampling }, controller.signal);
      if (response.status === 400 && "max_tokens" in sampling) {
        // The page cannot count tokens; the server can. A conversation that leaves less room than
        // Max tokens asks for gets what is left of the context: without max_tokens, the server
        // gives min(its default, the room left), never more than the slider asked for.
        const message = await errorMessage(response.clone());
        if (/maximum context length/.test(message) && /were requested/.test(message)) {
          delete sampling.max_tokens;
          response = await postChat({ model, messages, stream: true, ...sampling }, controller.signal);
        }
      }
      if (!response.ok) throw await apiError(response);
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        reply.id = reply.id || chunk.id || null;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          reply.original += piece;
          reply.textNode.appendData(piece);
          scrollToEnd(false);
        }
        if (choice.finish_reason) reply.finishReason = choice.finish_reason;
      }
    } catch (error) {
      if (error.name === "AbortError") reply.stopped = true;
      else showError(error.message, error.kind);
    } finally {
      finishReply(reply, user);
      if (state.controller === controller) {
        state.controller = null;
        setBusy(false);
      }
    }
  }

  function finishReply(reply, user) {
    reply.node.classList.remove("streaming");
    reply.node.removeAttribute("aria-busy");
    if (!reply.node.isConnected) return; // "New chat" cleared it meanwhile
    if (!reply.original) {
      // Nothing came back: take the question out of the conversation and give it back to edit.
      reply.node.remove();
      user.node.remove();
      state.turns = state.turns.filter((turn) => turn !== user);
      if (!$("message-input").value) $("message-input").value = user.content;
      return;
    }
    reply.content = reply.original;
    state.turns.push(reply);
    const cut = reply.stopped ? "(stopped)" : reply.finishReason === "length" ? "(cut at max tokens)" : null;
    if (cut) {
      const note = document.createElement("span");
      note.className = "edited-mark";
      note.dataset.testid = "reply-cut";
      note.textContent = cut;
      reply.node.querySelector(".role").appendChild(note);
    }
    addReplyTools(reply);
  }

  // ---- feedback ---------------------------------------------------------------------------
  let editorCount = 0;

  function addReplyTools(reply) {
    const tools = $("reply-tools-template").content.firstElementChild.cloneNode(true);
    reply.node.appendChild(tools);
    const up = tools.querySelector("[data-testid=thumbs-up]");
    const down = tools.querySelector("[data-testid=thumbs-down]");
    const status = tools.querySelector("[data-testid=feedback-status]");
    const rate = (rating) => {
      if (reply.rating === rating) return; // already recorded
      reply.rating = rating;
      up.setAttribute("aria-pressed", String(rating === "up"));
      down.setAttribute("aria-pressed", String(rating === "down"));
      sendFeedback(reply, status);
    };
    up.addEventListener("click", () => rate("up"));
    down.addEventListener("click", () => rate("down"));
    tools.querySelector("[data-testid=edit]").addEventListener("click", () => openEditor(reply, tools, status));
  }

  function openEditor(reply, tools, status) {
    if (reply.node.querySelector(".editor")) return;
    const editor = $("editor-template").content.firstElementChild.cloneNode(true);
    const area = editor.querySelector("textarea");
    const save = editor.querySelector("[data-testid=edit-save]");
    area.id = `edit-text-${++editorCount}`;
    editor.querySelector("label").htmlFor = area.id;
    area.value = reply.content;
    const text = reply.node.querySelector(".text");
    text.hidden = true;
    tools.hidden = true;
    reply.node.insertBefore(editor, tools);
    // An edit equal to the model's reply is no preference; an empty one is no answer.
    const check = () => {
      save.disabled = !area.value.trim() || area.value === reply.original;
    };
    area.addEventListener("input", check);
    check();
    area.focus();
    const close = () => {
      editor.remove();
      text.hidden = false;
      tools.hidden = false;
    };
    editor.querySelector("[data-testid=edit-cancel]").addEventListener("click", close);
    save.addEventListener("click", () => {
      const changed = area.value !== reply.content;
      close();
      if (!changed) return;
      reply.edited = area.value;
      reply.content = area.value;
      reply.textNode.data = area.value;
      if (!reply.node.querySelector(".role .edited-mark.edit")) {
        const mark = document.createElement("span");
        mark.className = "edited-mark edit";
        mark.textContent = "(edited)";
        reply.node.querySelector(".role").appendChild(mark);
      }
      sendFeedback(reply, status);
    });
  }

  async function sendFeedback(reply, status) {
    status.classList.remove("failed");
    status.textContent = "Saving…";
    const body = {
      reply_id: reply.id,
      model: state.model,
      messages: reply.messagesBefore,
      completion: reply.original,
      rating: reply.rating,
      edited: reply.edited,
      sampling: reply.sampling,
    };
    try {
      const response = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      if (!response.ok) throw new Error(await errorMessage(response));
      status.textContent = "Saved";
    } catch (error) {
      status.classList.add("failed");
      status.textContent = `Not saved: ${error.message}`;
    }
  }

  // ---- wiring -----------------------------------------------------------------------------
  function newChat() {
    if (state.controller) state.controller.abort();
    state.controller = null;
    setBusy(false);
    state.turns = [];
    $("messages").replaceChildren();
    clearError();
    $("message-input").focus();
  }

  function init() {
    for (const slider of Object.values(sliders)) {
      const input = $(slider.id);
      const output = $(`${slider.id}-value`);
      const update = () => {
        output.textContent = slider.show(input.value);
      };
      input.addEventListener("input", update);
      update();
    }
    $("max-tokens").addEventListener("input", () => {
      state.maxTokensTouched = true;
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("message-input");
      const text = input.value.trim();
      if (!text || state.controller) return;
      input.value = "";
      send(text);
    });
    $("message-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("new-chat").addEventListener("click", newChat);
    // A new key asks for the model list again, once typing pauses: the header shows the model as
    // soon as the key is right, and a wrong key says so before a message is lost on it.
    let keyTimer = null;
    $("api-key").addEventListener("input", () => {
      clearTimeout(keyTimer);
      keyTimer = setTimeout(refreshModel, 300);
    });
    // Show the model's name at once, or that the server needs an API key.
    refreshModel();
  }

  init();
})();
