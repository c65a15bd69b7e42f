// The page served at `/` by `onnxcam serve`: pick an image, see the top classes, explain any of them.
// It talks to the server's own endpoints only (GET /ui/info, POST /v1/models/NAME:predict and :explain) and
// draws the overlay itself, the way onnxcam.render.overlay does, so that the opacity can change without a
// round trip. The last explanation is exposed as `window.onnxcam` for tests and curious users.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_K = 5;

const state = {
  info: null,
  file: null,         // the picked File
  dataUrl: null,      // its bytes as a data: URL, sent as the V1 instance
  photo: null,        // ImageData of the picture at display size
  scores: null,       // logits from :predict
  explanation: null,  // the last :explain answer
  heatmap: null,      // Float32Array (H * W), as received
  heatmapShape: null, // [H, W]
  seq: 0,             // answers to superseded requests are dropped
};
window.onnxcam = state;

function setStatus(text, kind) {
  document.body.dataset.status = kind;
  $("status").textContent = text;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  let payload;
  try {
    payload = await response.json();
  } catch (e) {
    throw new Error(`the server answered ${response.status} without JSON`);
  }
  if (!response.ok) throw new Error(payload.error || `the server answered ${response.status}`);
  return payload;
}

function v1(kind) {
  return `/v1/models/${encodeURIComponent(state.info.name)}:${kind}`;
}

// ----------------------------------------------------------------------------- start-up

async function start() {
  try {
    state.info = await api("/ui/info");
  } catch (e) {
    setStatus(`cannot read the model's description: ${e.message}`, "error");
    return;
  }
  const info = state.info;
  $("model").textContent = `${info.name} · layer ${info.layer} · ${info.provider}`;
  const select = $("method");
  for (const m of info.methods) {
    const option = new Option(m.default ? `${m.name} (server default)` : m.name, m.name, m.default, m.default);
    option.title = m.help;
    select.add(option);
  }
  select.disabled = info.methods.length < 2;
  $("method-note").textContent = info.methods.length < 2
    ? `This server runs ${info.method} only.`
    : "Other methods are built on the server the first time they are used (a few seconds).";
  if (info.labels) {
    const list = $("labels");
    info.labels.forEach((label) => list.append(new Option(label)));
  }
  if (!info.images) {
    setStatus(`This model takes arrays, not images: ${info.images_error}`, "error");
    return;
  }
  setStatus("Pick an image to start.", "idle");
}

// ----------------------------------------------------------------------------- choosing an image

async function choose(file) {
  if (!file) return;
  if (!/^image\/(png|jpeg)$/.test(file.type)) {
    setStatus(`${file.name}: the server takes PNG or JPEG images`, "error");
    return;
  }
  if (file.size * 4 / 3 + 1024 > state.info.max_body_bytes) {  // base64 grows the bytes by a third
    setStatus(`${file.name} is too large for this server (--max-body-mb)`, "error");
    return;
  }
  const seq = ++state.seq;
  setStatus(`Reading ${file.name}…`, "busy");
  try {
    const [dataUrl, photo] = await Promise.all([readDataUrl(file), decode(file)]);
    if (seq !== state.seq) return;
    Object.assign(state, {file, dataUrl, photo, scores: null, explanation: null, heatmap: null});
    drawPhoto();
    setStatus("Classifying…", "busy");
    const answer = await api(v1("predict"), {instances: [dataUrl]});
    if (seq !== state.seq) return;
    state.scores = answer.predictions[0].scores;
    showTop();
    for (const id of ["label", "label-go"]) $(id).disabled = false;
    await explain(topClasses()[0].index);
  } catch (e) {
    if (seq === state.seq) {
      setStatus(e.message, "error");
      enableControls();
    }
  }
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// The picture at the size the server would draw its overlay: the longest side at most overlay_side.
async function decode(file) {
  const url = URL.createObjectURL(file);
  try {
    const img = new Image();
    img.src = url;
    await img.decode();
    const side = state.info.overlay_side;
    const scale = Math.min(1, side / Math.max(img.naturalWidth, img.naturalHeight));
    const w = Math.max(1, Math.round(img.naturalWidth * scale));
    const h = Math.max(1, Math.round(img.naturalHeight * scale));
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d", {willReadFrequently: true});
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, 0, 0, w, h);
    return ctx.getImageData(0, 0, w, h);
  } catch (e) {
    throw new Error(`${file.name}: the browser cannot decode this image`);
  } finally {
    URL.revokeObjectURL(url);
  }
}

// ----------------------------------------------------------------------------- classes

function softmax(x) {
  const max = Math.max(...x);
  const e = x.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function labelOf(k) {
  const labels = state.info.labels;
  return labels && k < labels.length ? labels[k] : `class ${k}`;
}

function topClasses() {
  const p = softmax(state.scores);
  return p.map((prob, index) => ({index, prob}))
    .sort((a, b) => b.prob - a.prob || a.index - b.index)
    .slice(0, TOP_K);
}

function showTop() {
  const list = $("top");
  list.replaceChildren();
  for (const {index, prob} of topClasses()) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.class = index;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(prob * 100).toFixed(1)}%`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = labelOf(index);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = `${(prob * 100).toFixed(1)}%`;
    button.append(bar, name, p);
    button.title = `class ${index}`;
    button.addEventListener("click", () => explain(index));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
  markActive();
}

function markActive() {
  const k = state.explanation ? state.explanation.class : null;
  for (const b of $("top").querySelectorAll("button")) b.classList.toggle("active", Number(b.dataset.class) === k);
}

// ----------------------------------------------------------------------------- explaining

// `target`: a class index, or a label the server resolves (it says which labels come close when none matches).
async function explain(target) {
  if (!state.dataUrl) return;
  const seq = ++state.seq;
  const method = $("method").value;
  const counterfactual = $("counterfactual").checked && hasGradients(method);
  setStatus(`Explaining ${typeof target === "number" ? labelOf(target) : `'${target}'`} with ${method}…`, "busy");
  $("download").disabled = true;  // until the new overlay is drawn; a later click supersedes this request
  try {
    const answer = await api(v1("explain"), {instances: [state.dataUrl], target, method, counterfactual});
    if (seq !== state.seq) return;
    const e = answer.explanations[0];
    const rows = e.heatmap;
    state.explanation = {class: e.class, label: e.label, score: e.score, probability: e.probability,
                         method: e.method, counterfactual: e.counterfactual};
    state.heatmapShape = [rows.length, rows[0].length];
    state.heatmap = Float32Array.from(rows.flat());
    render();
    markActive();
    const sign = e.counterfactual ? "counterfactual " : "";
    $("caption").textContent = `${sign}${e.method} for ${e.label} (class ${e.class}, p = ${e.probability.toFixed(3)})`;
    setStatus("", "ready");
  } catch (err) {
    if (seq === state.seq) setStatus(err.message, "error");
  } finally {
    if (seq === state.seq) enableControls();
  }
}

function enableControls() {
  $("method").disabled = state.info.methods.length < 2;
  $("counterfactual").disabled = !hasGradients($("method").value);
  $("download").disabled = state.heatmap === null;
}

function hasGradients(method) {
  const m = state.info.methods.find((x) => x.name === method);
  return Boolean(m && m.gradients);
}

// ----------------------------------------------------------------------------- drawing (as onnxcam.render does)

// matplotlib's jet: (x, value) control points per channel, as onnxcam.render._JET.
const JET = [
  [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
  [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
  [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
];

function interp(v, points) {
  for (let i = 1; i < points.length; i++) {
    const [x1, y1] = points[i];
    if (v <= x1) {
      const [x0, y0] = points[i - 1];
      return x1 === x0 ? y1 : y0 + (y1 - y0) * (v - x0) / (x1 - x0);
    }
  }
  return points[points.length - 1][1];
}

// Pillow's bilinear resampling weights (Resample.c, precompute_coeffs), so that the map is stretched onto the
// picture exactly as the server and the CLI stretch it.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filterscale;  // the triangle filter's support is 1
  const out = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize);
    const weights = [];
    let total = 0;
    for (let x = xmin; x < xmax; x++) {
      const w = Math.max(0, 1 - Math.abs((x - center + 0.5) / filterscale));
      weights.push(w);
      total += w;
    }
    out.push({xmin, weights: weights.map((w) => (total ? w / total : 0))});
  }
  return out;
}

function resize(src, h, w, outH, outW) {
  let data = src;
  let width = w;
  if (outW !== w) {  // Pillow: horizontal pass first, into float32
    const cx = coefficients(w, outW);
    const tmp = new Float32Array(h * outW);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < outW; x++) {
        const {xmin, weights} = cx[x];
        let s = 0;
        for (let k = 0; k < weights.length; k++) s += data[y * width + xmin + k] * weights[k];
        tmp[y * outW + x] = s;
      }
    }
    data = tmp;
    width = outW;
  }
  if (outH !== h) {
    const cy = coefficients(h, outH);
    const tmp = new Float32Array(outH * width);
    for (let y = 0; y < outH; y++) {
      const {xmin, weights} = cy[y];
      for (let x = 0; x < width; x++) {
        let s = 0;
        for (let k = 0; k < weights.length; k++) s += data[(xmin + k) * width + x] * weights[k];
        tmp[y * width + x] = s;
      }
    }
    data = tmp;
  }
  return data;
}

// numpy's rounding (half to even): a blend at opacity 0.5 of two integers lands on .5 half the time.
function roundEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function alpha() {
  return Number($("alpha").value);
}

function drawPhoto() {
  const canvas = $("overlay");
  canvas.width = state.photo.width;
  canvas.height = state.photo.height;
  canvas.getContext("2d").putImageData(state.photo, 0, 0);
  canvas.hidden = false;
  $("drop").classList.add("loaded");
  $("drop").title = "Drop or click to explain another image";
  $("caption").textContent = "";
  $("top").replaceChildren(Object.assign(document.createElement("li"), {className: "empty", textContent: "…"}));
}

function render() {
  const canvas = $("overlay");
  const {width, height, data: photo} = state.photo;
  const [h, w] = state.heatmapShape;
  const heat = resize(state.heatmap, h, w, height, width);
  const a = alpha();
  // render.overlay blends in float32: the same roundings here give the same pixels
  const wPhoto = Math.fround(1 - a), wColour = Math.fround(a), f = Math.fround;
  const out = new ImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const v = Math.min(1, Math.max(0, heat[i] || 0));
    for (let c = 0; c < 3; c++) {
      const colour = roundEven(interp(v, JET[c]) * 255);
      out.data[4 * i + c] = roundEven(f(f(wPhoto * photo[4 * i + c]) + f(wColour * colour)));
    }
    out.data[4 * i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
  const e = state.explanation;
  Object.assign(canvas.dataset, {class: e.class, label: e.label, method: e.method,
                                 counterfactual: e.counterfactual, alpha: a});
}

function download() {
  const e = state.explanation;
  const stem = (state.file.name.replace(/\.[^.]*$/, "") || "image").replace(/[^\w.-]+/g, "_");
  const name = `${stem}_${e.label.replace(/[^\w.-]+/g, "_")}_${e.method}${e.counterfactual ? "_cf" : ""}.png`;
  $("overlay").toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, "image/png");
}

// ----------------------------------------------------------------------------- wiring

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => {
    choose(ev.target.files[0]);
    ev.target.value = "";  // picking the same file again is a change too
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    choose(ev.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); }
  });
  $("label-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("label").value.trim();
    if (!text) return;
    explain(/^\d+$/.test(text) ? Number(text) : text);
  });
  const again = () => { if (state.explanation) explain(state.explanation.class); };
  $("method").addEventListener("change", () => {
    $("counterfactual").disabled = !hasGradients($("method").value);
    again();
  });
  $("counterfactual").addEventListener("change", again);
  $("alpha").addEventListener("input", () => {
    $("alpha-value").textContent = alpha().toFixed(2);
    if (state.heatmap) render();
  });
  $("download").addEventListener("click", download);
}

wire();
start();
