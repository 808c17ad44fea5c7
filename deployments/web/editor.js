// The fisedit-ray web editor: plain JavaScript over the service's HTTP API (no dependencies).
// A session lives in this browser's localStorage (its id and token); everything else is read back
// from the service, so a reload, or another browser given the same token, shows the same tree.
"use strict";

const $ = (id) => document.getElementById(id);
const STORAGE_KEY = "fisedit-session";
const PAINT = [40, 150, 255, 150]; // RGBA of painted mask cells on screen
const FOUND = [255, 40, 40, 120]; // RGBA of a found (or sent) mask over the parent

const state = { session: null, token: null, versions: new Map(), selected: null, busy: false };
const imageCache = new Map(); // URL -> object URL of the fetched PNG

// ---- the API ---------------------------------------------------------------------------------
function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

function describe(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

// POST with ?stream=true: newline-delimited JSON events (steps, mask search) and then the version.
async function streamed(url, body, onEvent) {
  const response = await fetch(`${url}?stream=true`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    const payload = await response.json().catch(() => ({ detail: response.statusText }));
    throw new Error(`${response.status}: ${describe(payload.detail)}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (!line.trim()) continue;
      const event = JSON.parse(line);
      if (event.event === "version") return event;
      if (event.event === "error") throw new Error(`${event.status}: ${describe(event.detail)}`);
      onEvent(event);
    }
  }
  throw new Error("the service closed the stream before the version was ready; try again");
}

async function getJSON(url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) {
    const payload = await response.json().catch(() => ({ detail: response.statusText }));
    const error = new Error(`${response.status}: ${describe(payload.detail)}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

async function imageURL(url) {
  if (!imageCache.has(url)) {
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) throw new Error(`${response.status} for ${url}`);
    imageCache.set(url, URL.createObjectURL(await response.blob()));
  }
  return imageCache.get(url);
}

// ---- status, progress, messages ---------------------------------------------------------------
function setStatus(text) {
  $("status").textContent = text;
}

function onProgress(event) {
  if (event.event === "mask") {
    setStatus("finding the region the prompt change affects...");
  } else if (event.event === "step") {
    $("progress").max = event.steps;
    $("progress").value = event.step;
    setStatus(`denoising step ${event.step} of ${event.steps}`);
  }
}

function showMessage(id, text) {
  $(id).hidden = !text;
  $(id).textContent = text || "";
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("edit").disabled = busy || !state.selected;
  document.body.classList.toggle("busy", busy);
}

async function work(label, task) {
  setBusy(true);
  showMessage("error", "");
  $("progress").value = 0;
  setStatus(label);
  try {
    await task();
  } catch (error) {
    showMessage("error", String(error.message || error));
    setStatus("failed");
  } finally {
    setBusy(false);
  }
}

// ---- the mask painter -------------------------------------------------------------------------
const painter = { canvas: $("paint"), drawing: false, painted: false };

function resetPainter(width, height) {
  painter.canvas.width = width;
  painter.canvas.height = height;
  painter.painted = false;
}

function paintAt(event) {
  const canvas = painter.canvas;
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  const context = canvas.getContext("2d");
  const erase = $("eraser").checked;
  context.globalCompositeOperation = erase ? "destination-out" : "source-over";
  context.fillStyle = `rgba(${PAINT.join(",")})`;
  context.beginPath();
  context.arc(x, y, Number($("brush-size").value) / 2, 0, 2 * Math.PI);
  context.fill();
  painter.painted = painter.painted || !erase;
}

painter.canvas.addEventListener("pointerdown", (event) => {
  if (!state.selected) return;
  painter.drawing = true;
  painter.canvas.setPointerCapture(event.pointerId);
  paintAt(event);
});
painter.canvas.addEventListener("pointermove", (event) => painter.drawing && paintAt(event));
painter.canvas.addEventListener("pointerup", () => (painter.drawing = false));
$("clear-mask").addEventListener("click", () => resetPainter(painter.canvas.width, painter.canvas.height));

// The painted cells as the API's mask: a PNG at the image's size, white = edit. Null if none.
function paintedMaskPNG() {
  const { width, height } = painter.canvas;
  const pixels = painter.canvas.getContext("2d").getImageData(0, 0, width, height);
  let any = false;
  for (let i = 0; i < pixels.data.length; i += 4) {
    const on = pixels.data[i + 3] > 0;
    any = any || on;
    pixels.data.fill(on ? 255 : 0, i, i + 3);
    pixels.data[i + 3] = 255;
  }
  if (!any) return null;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png").split(",")[1];
}

// A mask PNG (white = edit) as a translucent colour over whatever lies beneath.
async function tinted(maskURL, rgba) {
  const bitmap = await createImageBitmap(await (await fetch(maskURL)).blob());
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const on = pixels.data[i] > 127;
    pixels.data.set(on ? rgba : [0, 0, 0, 0], i);
  }
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

// ---- versions: the tree, the stage, the figures ------------------------------------------------
function saveSession() {
  localStorage.setItem(STORAGE_KEY, JSON.stringify({ session: state.session, token: state.token }));
}

async function loadTree() {
  const tree = await getJSON(`v1/sessions/${state.session}`);
  state.versions = new Map(tree.versions.map((v) => [v.version_id, v]));
  renderTree();
}

function label(version) {
  const s = version.stats || {};
  const mode = version.parent ? s.mode || "edit" : "generated";
  const share = s.mask_ratio != null ? `, mask ${(100 * s.mask_ratio).toFixed(1)}%` : "";
  return `${mode}${share}`;
}

function renderTree() {
  const children = new Map();
  for (const v of state.versions.values()) {
    const siblings = children.get(v.parent) || [];
    siblings.push(v);
    children.set(v.parent, siblings);
  }
  const branch = (parent) => {
    const list = document.createElement("ul");
    for (const v of children.get(parent) || []) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.className = "version" + (v.version_id === state.selected ? " selected" : "");
      button.dataset.versionId = v.version_id;
      button.title = "Select this version: the next edit starts from it";
      button.textContent = v.prompt;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = ` ${label(v)}`;
      button.append(meta);
      button.addEventListener("click", () => !state.busy && select(v.version_id));
      item.append(button);
      if (children.has(v.version_id)) item.append(branch(v.version_id));
      list.append(item);
    }
    return list;
  };
  $("tree").replaceChildren(branch(null));
}

function renderFigures(version) {
  const s = version.stats || {};
  const rows = [["prompt", version.prompt], ["version", version.version_id]];
  if (version.parent) {
    rows.push(["mode", s.mode], ["mask source", s.mask_source]);
    if (s.mask_ratio != null) rows.push(["mask share", `${(100 * s.mask_ratio).toFixed(1)}%`]);
  }
  if (s.macs_dense) {
    const saved = 1 - s.macs_executed / s.macs_dense;
    rows.push(["U-Net GMACs", `${(s.macs_executed / 1e9).toFixed(2)} of ${(s.macs_dense / 1e9).toFixed(2)}`]);
    rows.push(["MACs saved", `${(100 * saved).toFixed(1)}%`]);
  }
  if (s.seconds) rows.push(["seconds", s.seconds.total.toFixed(2)]);
  $("figures").replaceChildren(
    ...rows.map(([name, value]) => {
      const row = document.createElement("tr");
      row.dataset.name = name;
      for (const text of [name, value ?? "-"]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }),
  );
}

async function select(versionId) {
  const version = state.versions.get(versionId);
  state.selected = versionId;
  renderTree();
  renderFigures(version);
  $("prompt").value = version.prompt;
  const image = $("image");
  image.src = await imageURL(version.image_url);
  await image.decode();
  resetPainter(image.naturalWidth, image.naturalHeight);
  $("image-caption").textContent = `${label(version)}: ${version.prompt}`;
  const parent = version.parent && state.versions.get(version.parent);
  $("before-pane").hidden = !parent;
  if (parent) {
    $("before").src = await imageURL(parent.image_url);
    $("before-mask").src = await tinted(await imageURL(version.mask_url), FOUND);
  }
  showMessage("warnings", (version.warnings || []).map((w) => `warning: ${w}`).join("\n"));
  setBusy(state.busy);
}

// ---- actions ----------------------------------------------------------------------------------
async function generate() {
  await work("generating...", async () => {
    const body = { prompt: $("prompt").value, seed: Number($("seed").value), steps: Number($("steps").value) };
    state.token = null;
    const made = await streamed("v1/sessions", body, onProgress);
    Object.assign(state, { session: made.session_id, token: made.token });
    saveSession();
    $("dense-pane").hidden = true;
    await loadTree();
    await select(made.version_id);
    setStatus(`generated in ${made.stats.seconds.total.toFixed(2)} s`);
  });
}

async function edit() {
  const parentId = state.selected;
  const prompt = $("prompt").value;
  const mask = paintedMaskPNG();
  await work(mask ? "editing inside the painted mask..." : "editing...", async () => {
    const url = `v1/sessions/${state.session}/versions/${parentId}/edits`;
    const body = mask ? { prompt, mask_png: mask } : { prompt };
    const made = await streamed(url, body, onProgress);
    await loadTree();
    await select(made.version_id);
    let done = `edited in ${made.stats.seconds.total.toFixed(2)} s`;
    $("dense-pane").hidden = true;
    if ($("dense-beside").checked) {
      setStatus("regenerating densely, for comparison...");
      const dense = await streamed(url, { prompt, mode: "dense" }, onProgress);
      await loadTree();
      renderTree();
      $("dense-image").src = await imageURL(dense.image_url);
      const seconds = dense.stats.seconds.total.toFixed(2);
      $("dense-caption").textContent = `dense regeneration (${seconds} s, all of the image recomputed)`;
      $("dense-pane").hidden = false;
      done += `; dense regeneration ${seconds} s`;
    }
    setStatus(done);
  });
}

$("generate").addEventListener("click", generate);
$("edit").addEventListener("click", edit);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !state.busy) (state.selected ? edit : generate)();
});
$("new-session").addEventListener("click", () => {
  localStorage.removeItem(STORAGE_KEY);
  location.reload();
});

// A session this browser started before: shown again, as the service keeps it.
(async function restore() {
  const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
  if (!saved) return;
  Object.assign(state, { session: saved.session, token: saved.token });
  try {
    await loadTree();
    const last = [...state.versions.values()].pop();
    if (last) await select(last.version_id);
    setStatus("session restored");
  } catch (error) {
    if (error.status === 404) localStorage.removeItem(STORAGE_KEY);
    showMessage("error", `could not restore the session: ${error.message}`);
  }
})();
