// chiasm's web page: a streamed chat about an image beside "how the model sees" it.
// Talks only to the server's own routes, by relative URL: GET v1/models, POST v1/chat/completions
// (stream: true, Server-Sent Events) and POST v1/explain. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEW_SIDE = 480; // the longer side of the image on the canvas, in CSS pixels

const state = {
  model: "chiasm",
  image: null, // data URL of the chosen image
  imageName: "",
  picture: null, // decoded <img> of it, for the canvas
  messages: [], // the conversation in OpenAI's format; the image rides in the first user message
  busy: false,
  explain: null, // the last answer of POST v1/explain
  focus: null, // index of the answer token whose attention is shown, null: the mean over the answer
  hover: null, // index of the visual token under the pointer
};

// ---- server errors ---------------------------------------------------------------------------
async function errorText(res) {
  const body = await res.text();
  let message = body.trim();
  try {
    const data = JSON.parse(body);
    message = data?.error?.message ?? data?.detail ?? data?.message ?? message;
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch (_) {
    // not JSON: the body as it came
  }
  return `Server error ${res.status}: ${message || res.statusText || "no message"}`;
}

async function post(url, body) {
  let res;
  try {
    res = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  } catch (err) {
    throw new Error(`Cannot reach the server (${err.message})`);
  }
  if (!res.ok) throw new Error(await errorText(res));
  return res;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

// ---- streaming -------------------------------------------------------------------------------
// Reads an OpenAI chat-completion stream: events separated by a blank line, "data: {json}" lines,
// "data: [DONE]" at the end. Returns the finish reason of the first choice.
async function readStream(res, onText) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    buffer += decoder.decode(value ?? new Uint8Array(), {stream: !done});
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer)) !== null) {
      const event = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return finish;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        throw new Error(`The server sent a stream event that is not JSON: ${data.slice(0, 200)}`);
      }
      if (chunk.error) throw new Error(`Server error: ${chunk.error.message ?? JSON.stringify(chunk.error)}`);
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      if (choice.delta?.content) onText(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (done) break;
  }
  if (finish === null) throw new Error("The answer stream ended before the server finished it");
  return finish;
}

// ---- the conversation ------------------------------------------------------------------------
function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "model";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("messages").append(li);
  li.scrollIntoView({block: "end"});
  return li;
}

function userContent(question) {
  const first = !state.messages.some((m) => m.role === "user");
  if (!first || !state.image) return question;
  // The image before the question, as the model was trained ("<image>\nquestion") and as v1/explain asks.
  return [{type: "image_url", image_url: {url: state.image}}, {type: "text", text: question}];
}

async function ask(event) {
  event.preventDefault();
  if (state.busy) return;
  const question = $("question").value.trim();
  if (!question) return;
  const maxTokens = Number($("max-tokens").value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    showError(`max tokens must be a whole number of at least 1, not "${$("max-tokens").value}"`);
    return;
  }
  const temperature = Number($("temperature").value);
  if ($("temperature").value.trim() === "" || !Number.isFinite(temperature)) {
    showError(`temperature must be a number (0: greedy), not "${$("temperature").value}"`);
    return;
  }
  showError("");
  setBusy(true);
  const turn = {role: "user", content: userContent(question)};
  const userLi = addMessage("user", question);
  const answerLi = addMessage("assistant", "");
  answerLi.dataset.state = "streaming";
  const text = answerLi.querySelector(".text");
  let answer = "";
  try {
    const res = await post("v1/chat/completions", {
      model: state.model, messages: [...state.messages, turn], stream: true, max_tokens: maxTokens, temperature,
    });
    let pieces = 0;
    const finish = await readStream(res, (piece) => {
      answer += piece;
      text.textContent = answer;
      answerLi.dataset.pieces = String(++pieces);
    });
    answerLi.dataset.state = "done";
    if (!answer.trim()) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = answer ? `(whitespace only: ${JSON.stringify(answer)})` : "(empty answer)";
      answerLi.append(note);
    }
    answerLi.dataset.finish = finish;
    if (finish === "length") answerLi.title = "cut at max tokens";
    state.messages.push(turn, {role: "assistant", content: answer});
    $("question").value = "";
    if (state.image) explain(question, answer);
  } catch (err) {
    // The failed turn leaves the conversation as it was; the question stays in the box.
    userLi.remove();
    answerLi.remove();
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("send").textContent = busy ? "Answering…" : "Ask";
}

function reset() {
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
}

// ---- the image -------------------------------------------------------------------------------
function chooseFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onerror = () => showError(`Could not read ${file.name}: ${reader.error?.message ?? "unknown error"}`);
  reader.onload = () => {
    const picture = new Image();
    picture.onload = () => {
      state.image = reader.result;
      state.imageName = file.name;
      state.picture = picture;
      $("preview").src = reader.result;
      $("preview").hidden = false;
      $("drop-hint").textContent = `${file.name} (${picture.naturalWidth} × ${picture.naturalHeight}); drop another to change it`;
      state.explain = null;
      $("explain-body").hidden = true;
      $("explain-status").textContent = "Ask a question to see how the model sees this image.";
      if (state.messages.length) $("drop-hint").textContent += " (a new image starts a new conversation)";
      reset();
    };
    picture.onerror = () => showError(`${file.name} is not an image this browser can read`);
    picture.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function setUpDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  $("image-input").addEventListener("change", (e) => chooseFile(e.target.files[0]));
}

// ---- how the model sees ----------------------------------------------------------------------
async function explain(question, answer) {
  const status = $("explain-status");
  status.textContent = "Looking inside the model…";
  status.classList.remove("error");
  document.body.dataset.explain = "loading";
  try {
    // The answer shown is the one explained (its attention), not a fresh generation that may differ.
    const res = await post("v1/explain", {image: state.image, question, answer});
    state.explain = await res.json();
    state.focus = null;
    state.hover = null;
    renderExplain();
    status.textContent = `For: “${question}”`;
  } catch (err) {
    status.textContent = err.message;
    status.classList.add("error");
    document.body.dataset.explain = "error";
  }
}

function wordLabel(word) {
  const text = word.text && !word.text.includes("\uFFFD") ? word.text : word.token;
  return JSON.stringify(text);
}

function fact(term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  $("facts").append(dt, dd);
}

function renderExplain() {
  const ex = state.explain;
  $("explain-body").hidden = false;
  $("facts").replaceChildren();
  const [rows, cols] = ex.encoder.grid;
  const tokenNorm = ex.tokens.reduce((s, t) => s + t.norm, 0) / Math.max(ex.tokens.length, 1);
  fact("image", `${ex.image.width} × ${ex.image.height} px`);
  fact("encoder", `${ex.model.encoder}: ${rows} × ${cols} ${ex.encoder.grid_kind} on a ${ex.encoder.input_size.join(" × ")} px input`);
  fact("bridge", `${ex.bridge.name}: ${ex.bridge.note}`);
  fact("visual tokens", `${ex.tokens.length}, mean norm ${tokenNorm.toFixed(2)} (words: ${ex.word_norm.toFixed(2)})`);
  const att = ex.attention;
  const onWhat = ex.bridge.in_lm && !ex.bridge.spatial ? "answer on the image marker" : "answer on the image";
  fact(onWhat, `${(100 * att.image_share).toFixed(1)}% of its attention (mean over ${att.heads} heads, layers ${att.layers.join(", ")})`);
  $("attention-note").textContent = att.note ?? "";
  $("show-tokens").disabled = !ex.bridge.spatial;
  $("show-heat").disabled = !att.heat_map;
  $("view").dataset.heat = att.heat_map ? `${att.heat_map.length}x${att.heat_map[0].length}` : "none";

  const answerTokens = $("answer-tokens");
  answerTokens.replaceChildren();
  ex.answer.tokens.forEach((piece, i) => {
    const span = document.createElement("span");
    span.className = "atoken";
    span.textContent = /\S/.test(piece) && !piece.includes("\uFFFD") ? piece : JSON.stringify(piece);
    const share = att.per_token[i]?.image_share;
    if (share !== undefined) span.title = `${(100 * share).toFixed(1)}% of its attention on the image`;
    span.addEventListener("mouseenter", () => { state.focus = i; draw(); });
    span.addEventListener("mouseleave", () => { state.focus = null; draw(); });
    answerTokens.append(span);
  });
  if (!ex.answer.tokens.length) answerTokens.textContent = "(empty answer: the attention shown predicts the end of the turn)";

  const list = $("visual-tokens");
  list.replaceChildren();
  ex.tokens.forEach((tok, k) => {
    const li = document.createElement("li");
    li.className = "vtoken";
    const where = tok.box ? `row ${tok.row}, col ${tok.col}` : "whole image";
    const share = att.token_attention[k];
    li.textContent = `#${tok.index} (${where}) ${tok.nearest.map(wordLabel).join(" ")}` +
      (share !== undefined ? `, ${(100 * share).toFixed(1)}% of the answer's attention` : "");
    li.addEventListener("mouseenter", () => { state.hover = k; draw(); showCard(k, null); });
    li.addEventListener("mouseleave", () => { state.hover = null; draw(); $("hover-card").hidden = true; });
    list.append(li);
  });
  draw();
  document.body.dataset.explain = "ready";
}

function viewScale() {
  const ex = state.explain;
  return VIEW_SIDE / Math.max(ex.image.width, ex.image.height);
}

// The heat drawn: per encoder cell (the heat map), or per visual token when the token cells are
// shown (finer than the encoder grid for an upsampling bridge, coarser for a compressing one).
// Returns the boxes and their values, or null where the bridge has no spatial layout.
function heatShown() {
  const ex = state.explain;
  const att = ex.attention;
  const one = state.focus !== null ? att.per_token[state.focus] : null;
  if ($("show-tokens").checked && ex.bridge.spatial) {
    return {boxes: ex.tokens.map((t) => t.box), values: one ? one.token_attention : att.token_attention, per: "visual token"};
  }
  const grid = one ? one.heat : att.heat_map;
  if (!grid) return null;
  return {boxes: ex.encoder.cells.map((c) => c.box), values: grid.flat(), per: `${ex.encoder.grid_kind} cell`};
}

function cellHeat(cellIndex) {
  const att = state.explain.attention;
  const grid = state.focus !== null ? att.per_token[state.focus].heat : att.heat_map;
  return grid ? grid.flat()[cellIndex] : null;
}

function draw() {
  const ex = state.explain;
  const canvas = $("view");
  const scale = viewScale();
  const ratio = window.devicePixelRatio || 1;
  const w = Math.round(ex.image.width * scale);
  const h = Math.round(ex.image.height * scale);
  canvas.style.width = `${w}px`;
  canvas.style.height = `${h}px`;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio * scale, 0, 0, ratio * scale, 0, 0);
  ctx.imageSmoothingEnabled = scale < 4;
  if (state.picture) ctx.drawImage(state.picture, 0, 0, ex.image.width, ex.image.height);
  const cells = ex.encoder.cells;
  const heat = heatShown();
  $("heat-legend").textContent = heat ? heatLegend(heat) : "";
  if ($("show-heat").checked && heat) {
    const low = Math.min(...heat.values);
    const high = Math.max(...heat.values);
    // Colour by rank between the least and the most attended box; a near-uniform map stays a light tint.
    const spread = high > 0 && (high - low) / high > 0.05;
    heat.boxes.forEach(([x0, y0, x1, y1], i) => {
      const alpha = spread ? 0.08 + 0.62 * (heat.values[i] - low) / (high - low) : 0.15;
      ctx.fillStyle = `rgba(255, 40, 0, ${alpha.toFixed(3)})`;
      ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    });
  }
  ctx.lineWidth = 1 / scale;
  if ($("show-grid").checked) {  // dark under light: visible on any picture
    ctx.lineWidth = 3 / scale;
    ctx.strokeStyle = "rgba(0, 0, 0, 0.35)";
    cells.forEach((cell) => strokeBox(ctx, cell.box));
    ctx.lineWidth = 1 / scale;
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    cells.forEach((cell) => strokeBox(ctx, cell.box));
  }
  if ($("show-tokens").checked && ex.bridge.spatial) {
    ctx.strokeStyle = "rgba(0, 220, 255, 0.9)";
    ctx.setLineDash([4 / scale, 3 / scale]);
    ex.tokens.forEach((tok) => strokeBox(ctx, tok.box));
    ctx.setLineDash([]);
  }
  if (state.hover !== null && ex.tokens[state.hover]?.box) {
    ctx.lineWidth = 3 / scale;
    ctx.strokeStyle = "#ffd400";
    strokeBox(ctx, ex.tokens[state.hover].box);
  }
}

function heatLegend(heat) {
  const pct = (v) => `${(100 * v).toFixed(2)}%`;
  const who = state.focus !== null ? `answer token ${JSON.stringify(state.explain.answer.tokens[state.focus])}`
    : "the answer (mean over its tokens)";
  return `Heat: attention of ${who} per ${heat.per}, from ${pct(Math.min(...heat.values))} to ` +
    `${pct(Math.max(...heat.values))}; ${pct(heat.values.reduce((a, b) => a + b, 0))} on the image in all.`;
}

function strokeBox(ctx, [x0, y0, x1, y1]) {
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
}

function inside([x0, y0, x1, y1], x, y) {
  return x >= x0 && x < x1 && y >= y0 && y < y1;
}

function showCard(tokenIndex, cellIndex) {
  const ex = state.explain;
  const card = $("hover-card");
  card.replaceChildren();
  const line = (text, cls) => {
    const p = document.createElement("p");
    p.textContent = text;
    if (cls) p.className = cls;
    card.append(p);
  };
  if (cellIndex !== null) {
    const cell = ex.encoder.cells[cellIndex];
    const value = cellHeat(cellIndex);
    line(`${ex.encoder.grid_kind} cell row ${cell.row}, col ${cell.col}` +
      (value !== null ? `: ${(100 * value).toFixed(2)}% of the attention` : ""), "cell");
  }
  if (tokenIndex !== null) {
    const tok = ex.tokens[tokenIndex];
    const att = ex.attention;
    const share = (state.focus !== null ? att.per_token[state.focus].token_attention : att.token_attention)[tokenIndex];
    line(`visual token #${tok.index}, position ${tok.sequence_index} in the sequence, norm ${tok.norm.toFixed(2)}, ` +
      `${(100 * share).toFixed(2)}% of the attention`);
    tok.nearest.forEach((w) => line(`${wordLabel(w)}  cos ${w.cosine.toFixed(3)}`, "word"));
  }
  card.hidden = false;
}

function onPointer(event) {
  const ex = state.explain;
  if (!ex) return;
  const rect = $("view").getBoundingClientRect();
  const scale = viewScale();
  const x = (event.clientX - rect.left) / scale;
  const y = (event.clientY - rect.top) / scale;
  const cell = ex.encoder.cells.findIndex((c) => inside(c.box, x, y));
  const token = ex.bridge.spatial ? ex.tokens.findIndex((t) => inside(t.box, x, y)) : -1;
  state.hover = token >= 0 ? token : null;
  draw();
  if (cell < 0 && token < 0) {
    $("hover-card").hidden = true;
    return;
  }
  showCard(state.hover, cell >= 0 ? cell : null);
}

// ---- start -----------------------------------------------------------------------------------
async function loadModel() {
  try {
    const res = await fetch("v1/models");
    if (!res.ok) throw new Error(await errorText(res));
    const data = await res.json();
    state.model = data.data?.[0]?.id ?? state.model;
    $("model-name").textContent = `model: ${state.model}`;
  } catch (err) {
    $("model-name").textContent = `model list unavailable (${err.message})`;
  }
}

setUpDrop();
$("ask").addEventListener("submit", ask);
$("reset").addEventListener("click", reset);
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});
for (const id of ["show-grid", "show-tokens", "show-heat"]) $(id).addEventListener("change", () => state.explain && draw());
$("view").addEventListener("mousemove", onPointer);
$("view").addEventListener("mouseleave", () => {
  state.hover = null;
  $("hover-card").hidden = true;
  if (state.explain) draw();
});
loadModel();
