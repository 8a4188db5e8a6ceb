// The annotation page: draws the image, the mask and the clicks; every action is one call of the JSON API.
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
let image = null, mask = null, clicks = [], current = null, list = [];

async function api(method, path, body) {
  const r = await fetch(path, {method, headers: {"Content-Type": "application/json"},
                               body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}

function say(text) { $("message").textContent = text || ""; }

// uncompressed COCO RLE (column-major runs, background first) -> alpha per pixel
function decode(rle) {
  const [h, w] = rle.size, out = new Uint8Array(h * w);
  let pos = 0, value = 0;
  for (const run of rle.counts) {
    if (value) for (let k = pos; k < pos + run; k++) { const x = Math.floor(k / h), y = k % h; out[y * w + x] = 1; }
    pos += run; value = 1 - value;
  }
  return out;
}

function draw() {
  if (!image) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
  ctx.drawImage(image, 0, 0);
  if (mask) {
    const overlay = ctx.getImageData(0, 0, canvas.width, canvas.height), d = overlay.data;
    for (let i = 0; i < mask.length; i++) if (mask[i]) {
      d[4 * i] = 0.5 * d[4 * i] + 20; d[4 * i + 1] = 0.5 * d[4 * i + 1] + 110; d[4 * i + 2] = 0.5 * d[4 * i + 2] + 127;
    }
    ctx.putImageData(overlay, 0, 0);
  }
  const r = Math.max(3, Math.round(Math.max(canvas.width, canvas.height) / 120));
  for (const c of clicks) {
    ctx.beginPath(); ctx.arc(c.x + 0.5, c.y + 0.5, r, 0, 2 * Math.PI);
    ctx.fillStyle = c.positive ? "#1faa3a" : "#d62b2b"; ctx.fill();
    ctx.lineWidth = 1.5; ctx.strokeStyle = "#fff"; ctx.stroke();
  }
}

function renderList(progress) {
  $("progress").textContent = `${progress.done} / ${progress.total} done`;
  const ol = $("images"); ol.innerHTML = "";
  for (const im of list) {
    const li = document.createElement("li");
    li.textContent = im.name;
    li.className = (im.done ? "done " : "") + (im.id === current ? "current" : "");
    li.onclick = () => open(im.id);
    ol.appendChild(li);
  }
}

async function refreshList() {
  const data = await api("GET", "/api/images");
  list = data.images; renderList(data);
}

function fit() {  // show the image as large as the stage allows (small images scaled up, pixels kept sharp)
  const stage = $("stage"), scale = Math.min((stage.clientWidth - 16) / canvas.width, (stage.clientHeight - 16) / canvas.height);
  if (scale > 0) { canvas.style.width = `${Math.floor(canvas.width * scale)}px`; canvas.style.height = `${Math.floor(canvas.height * scale)}px`; }
}
window.addEventListener("resize", fit);

async function open(id) {
  if (id === null || id === undefined) { say("every image is done"); return; }
  const state = await api("POST", "/api/open", {image: id});
  current = id; clicks = state.clicks; mask = null;
  const img = new Image();
  await new Promise((ok, bad) => { img.onload = ok; img.onerror = bad; img.src = `/api/images/${id}/file`; });
  image = img; canvas.width = img.naturalWidth; canvas.height = img.naturalHeight; fit();
  $("title").textContent = list[id] ? list[id].name : `image ${id}`;
  $("mode").value = state.mode;
  renderList(state); draw(); say("");
}

function toImage(event) {
  const rect = canvas.getBoundingClientRect();
  return {x: Math.floor((event.clientX - rect.left) * canvas.width / rect.width),
          y: Math.floor((event.clientY - rect.top) * canvas.height / rect.height)};
}

async function click(event, positive) {
  event.preventDefault();
  if (current === null) return;
  const p = toImage(event);
  try {
    const r = await api("POST", "/api/click", {x: p.x, y: p.y, positive});
    clicks.push({x: p.x, y: p.y, positive}); mask = decode(r.mask);
    $("latency").textContent = `${r.latency_ms.toFixed(0)} ms`;
    canvas.dataset.clicks = String(clicks.length);
    draw(); say("");
  } catch (e) { say(e.message); }
}

async function undo() {
  try {
    const r = await api("POST", "/api/undo"); clicks.pop(); mask = r.mask ? decode(r.mask) : null;
    canvas.dataset.clicks = String(clicks.length); draw();
  } catch (e) { say(e.message); }
}

async function reset() {
  try { await api("POST", "/api/reset"); clicks = []; mask = null; canvas.dataset.clicks = "0"; draw(); } catch (e) { say(e.message); }
}

async function accept() {
  try {
    const r = await api("POST", "/api/accept");
    await refreshList(); say(`saved object ${r.annotation_id}`);
    if (r.next === null) { current = null; image = null; mask = null; clicks = []; draw(); say("every image is done"); }
    else await open(r.next);
  } catch (e) { say(e.message); }
}

async function step(delta) {
  if (!list.length) return;
  const id = current === null ? 0 : (current + delta + list.length) % list.length;
  await open(id);
}

async function setMode(mode) {
  try { await api("POST", "/api/mode", {mode}); $("mode").value = mode; say(`${mode}: from the next image on`); } catch (e) { say(e.message); }
}

async function save() {
  try { const r = await api("POST", "/api/weights", {}); say(`weights saved: ${r.path}`); } catch (e) { say(e.message); }
}

canvas.addEventListener("click", (e) => click(e, !e.shiftKey));
canvas.addEventListener("contextmenu", (e) => click(e, false));
$("undo").onclick = undo; $("reset").onclick = reset; $("accept").onclick = accept;
$("prev").onclick = () => step(-1); $("next").onclick = () => step(1); $("save").onclick = save;
$("mode").onchange = (e) => setMode(e.target.value);
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "SELECT") return;
  const modes = {"1": "fixed", "2": "ia", "3": "sa", "4": "ia_sa"};
  if (e.key === "z" || e.key === "Z") undo();
  else if (e.key === "r" || e.key === "R") reset();
  else if (e.key === "Enter") accept();
  else if (e.key === "ArrowLeft") step(-1);
  else if (e.key === "ArrowRight") step(1);
  else if (e.key === "s" || e.key === "S") save();
  else if (modes[e.key]) setMode(modes[e.key]);
});

(async () => {
  await refreshList();
  const state = await api("GET", "/api/state");
  $("mode").value = state.mode;
  const first = list.find((im) => !im.done);
  await open(first ? first.id : 0);
})();
