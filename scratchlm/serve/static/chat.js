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
  async function errorMessage(response) {
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

  async function fetchModel() {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    if (!body.data || !body.data.length) throw new Error("the server lists no model");
    return body.data[0].id;
  }

  async function ensureModel() {
    if (!state.model) {
      state.model = await fetchModel();
      $("model-name").textContent = state.model;
    }
    return state.model;
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

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
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
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify({ model, messages, stream: true, ...sampling }),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
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
      if (error.name !== "AbortError") showError(error.message);
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
    if (reply.finishReason === "length") {
      const note = document.createElement("span");
      note.className = "edited-mark";
      note.textContent = "(cut at max tokens)";
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
    $("api-key").addEventListener("change", () => {
      if (!state.model) ensureModel().catch(() => {});
    });
    // Show the model's name at once; without the right API key this waits for the first message.
    ensureModel().catch(() => {});
  }

  init();
})();
