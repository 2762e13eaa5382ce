// The page of `onnxlrp web`: runs the compiled model (forward pass + LRP relevance) with onnxruntime-web, WebGPU
// when the browser has it and WebAssembly otherwise (`?backend=wasm|webgpu` forces one), and draws the heatmap.
// Everything it loads lies beside it: config.json, model.onnx and onnxruntime-web's files in ort/.

const $ = (id) => document.getElementById(id);
const config = await (await fetch(new URL('config.json', import.meta.url))).json();
const ort = await import(new URL(config.ort.script, import.meta.url).href);
ort.env.wasm.wasmPaths = new URL('ort/', import.meta.url).href;
// several threads need a cross-origin isolated page (COOP/COEP headers), which `python -m http.server` does not send
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
ort.env.logLevel = 'error';

const [channels, height, width] = config.shape;
const times = [];
let session = null;
let backend = null;
let busy = false;
let pending = null; // the newest input that arrived while an explanation was running

async function webgpuAdapter() {
  if (!navigator.gpu) return false;
  try { return Boolean(await navigator.gpu.requestAdapter()); } catch { return false; }
}

async function openSession() {
  const forced = new URLSearchParams(location.search).get('backend');
  const candidates = forced ? [forced] : (await webgpuAdapter() ? ['webgpu', 'wasm'] : ['wasm']);
  let failure = null;
  for (const candidate of candidates) {
    try {
      session = await ort.InferenceSession.create(new URL(config.model, import.meta.url).href,
        {executionProviders: [candidate], logSeverityLevel: 3});
      backend = candidate;
      // the first run compiles WebGPU's shaders (seconds on a software adapter): done here, not timed
      await session.run({
        [config.input]: new ort.Tensor('float32', new Float32Array(channels * height * width), [1, channels, height, width]),
        target: new ort.Tensor('int64', BigInt64Array.from([-1n]), [1]),
      });
      return;
    } catch (err) { failure = err; }
  }
  throw failure;
}

/** x = (image * scale - mean) / std per channel, image in [0, 1] as [C, H, W]. */
function preprocess(pixels) {
  const {scale, mean, std} = config.preprocess;
  const out = new Float32Array(pixels.length);
  const plane = height * width;
  for (let i = 0; i < pixels.length; i++) {
    const c = Math.floor(i / plane);
    out[i] = (pixels[i] * scale[c] - mean[c]) / std[c];
  }
  return out;
}

/** Run the compiled model on one image ([C, H, W] in [0, 1]); target -1 explains the predicted class. */
async function explain(pixels, target = -1) {
  const start = performance.now();
  const feeds = {
    [config.input]: new ort.Tensor('float32', preprocess(pixels), [1, channels, height, width]),
    target: new ort.Tensor('int64', BigInt64Array.from([BigInt(target)]), [1]),
  };
  const out = await session.run(feeds);
  const ms = performance.now() - start;
  times.push(ms);
  return {
    relevance: out.relevance.data, explainedClass: Number(out.explained_class.data[0]),
    scores: Array.from(out[config.score].data), ms,
  };
}

/** Matplotlib's "bwr": blue (negative) - white (0) - red (positive), symmetric around 0 as onnxlrp's PNGs. */
function bwr(v) {
  const t = (v + 1) / 2;
  return t < 0.5 ? [2 * t, 2 * t, 1] : [1, 2 * (1 - t), 2 * (1 - t)];
}

function drawHeatmap(relevance) {
  const canvas = $('heatmap');
  canvas.width = width;
  canvas.height = height;
  const plane = height * width;
  const summed = new Float64Array(plane);
  for (let i = 0; i < relevance.length; i++) summed[i % plane] += relevance[i];
  let peak = 0;
  for (const v of summed) peak = Math.max(peak, Math.abs(v));
  const ctx = canvas.getContext('2d');
  const image = ctx.createImageData(width, height);
  for (let i = 0; i < plane; i++) {
    const rgb = bwr(peak > 0 ? summed[i] / peak : 0);
    for (let k = 0; k < 3; k++) image.data[4 * i + k] = Math.round(255 * rgb[k]);
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function drawSeen(pixels) {
  const canvas = $('seen');
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d');
  const image = ctx.createImageData(width, height);
  const plane = height * width;
  for (let i = 0; i < plane; i++) {
    for (let k = 0; k < 3; k++) image.data[4 * i + k] = Math.round(255 * pixels[(channels === 3 ? k : 0) * plane + i]);
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function show(result) {
  drawHeatmap(result.relevance);
  const k = result.explainedClass;
  $('class').textContent = `${k} (score ${result.scores[k].toPrecision(3)})`;
  const ranked = result.scores.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  $('scores').innerHTML = ranked.map(([s, i]) => `<li>class ${i}: ${s.toPrecision(3)}</li>`).join('');
  const sorted = [...times].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  $('time').textContent = `${result.ms.toFixed(1)} ms (median ${median.toFixed(1)} ms over ${times.length})`;
}

/** Explain ``pixels`` and show the result; inputs that arrive meanwhile are coalesced into the newest one. */
async function update(pixels) {
  if (busy) { pending = pixels; return; }
  busy = true;
  try {
    drawSeen(pixels);
    const result = await explain(pixels, Number($('target').value));
    window.onnxlrp.last = {pixels, ...result};
    show(result);
  } catch (err) {
    $('status').textContent = `error: ${err.message}`;
    $('status').className = 'error';
  } finally {
    busy = false;
  }
  if (pending) { const next = pending; pending = null; await update(next); }
}

/** RGBA image data of size width x height as [C, H, W] in [0, 1] (grey: ITU-R 601 luma, as Pillow's "L"). */
function toPixels(data) {
  const plane = height * width;
  const pixels = new Float32Array(channels * plane);
  for (let i = 0; i < plane; i++) {
    const [r, g, b] = [data[4 * i], data[4 * i + 1], data[4 * i + 2]];
    if (channels === 1) pixels[i] = (r * 299 + g * 587 + b * 114) / 1000 / 255;
    else for (let c = 0; c < 3; c++) pixels[c * plane + i] = data[4 * i + c] / 255;
  }
  return pixels;
}

// ------------------------------------------------------------------ the drawing pad (one-channel models)

function setUpPad() {
  const pad = $('pad');
  const ctx = pad.getContext('2d', {willReadFrequently: true});
  const clear = () => { ctx.fillStyle = '#000'; ctx.fillRect(0, 0, pad.width, pad.height); };
  clear();
  let drawing = false;
  let last = null;
  const point = (event) => {
    const box = pad.getBoundingClientRect();
    return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
  };
  const stroke = (to) => {
    ctx.strokeStyle = '#fff';
    ctx.lineWidth = pad.width / 12;
    ctx.lineCap = 'round';
    ctx.beginPath();
    ctx.moveTo(...(last || to));
    ctx.lineTo(...to);
    ctx.stroke();
    last = to;
    update(padPixels(pad));
  };
  pad.addEventListener('pointerdown', (e) => { drawing = true; last = null; pad.setPointerCapture(e.pointerId); stroke(point(e)); });
  pad.addEventListener('pointermove', (e) => { if (drawing) stroke(point(e)); });
  pad.addEventListener('pointerup', () => { drawing = false; });
  $('clear').addEventListener('click', () => { clear(); update(padPixels(pad)); });
}

/** The drawing as the model's input: its bounding box scaled to 20/28 of the side and centred, as MNIST digits. */
function padPixels(pad) {
  const data = pad.getContext('2d', {willReadFrequently: true}).getImageData(0, 0, pad.width, pad.height).data;
  let [x0, y0, x1, y1] = [pad.width, pad.height, -1, -1];
  for (let y = 0; y < pad.height; y++) {
    for (let x = 0; x < pad.width; x++) {
      if (data[4 * (y * pad.width + x)] > 0) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    }
  }
  const small = document.createElement('canvas');
  small.width = width;
  small.height = height;
  const ctx = small.getContext('2d', {willReadFrequently: true});
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, width, height);
  if (x1 >= 0) {
    const side = Math.max(x1 - x0 + 1, y1 - y0 + 1);
    const fit = (20 / 28) * Math.min(width, height) / side;
    const [w, h] = [(x1 - x0 + 1) * fit, (y1 - y0 + 1) * fit];
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(pad, x0, y0, x1 - x0 + 1, y1 - y0 + 1, (width - w) / 2, (height - h) / 2, w, h);
  }
  return toPixels(ctx.getImageData(0, 0, width, height).data);
}

// ------------------------------------------------------------------ images: a file picker and drag and drop

async function fromFile(file) {
  const bitmap = await createImageBitmap(file);
  const canvas = document.createElement('canvas');
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(bitmap, 0, 0, width, height); // resized to the model's input, as `onnxlrp explain` does
  await update(toPixels(ctx.getImageData(0, 0, width, height).data));
}

function setUpFiles() {
  const drop = $('drop');
  $('file').addEventListener('change', (e) => { if (e.target.files[0]) fromFile(e.target.files[0]); });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files[0]) fromFile(e.dataTransfer.files[0]);
  });
}

// ------------------------------------------------------------------ start

window.onnxlrp = {explain, config, backend: null, last: null, busy: () => busy || pending !== null};
$('model-name').textContent = config.name;
$('rule').textContent = config.rule;
$('ort-version').textContent = config.ort.version;
for (let k = 0; k < (config.classes || 0); k++) $('target').add(new Option(`class ${k}`, String(k)));
$('target').addEventListener('change', () => { if (window.onnxlrp.last) update(window.onnxlrp.last.pixels); });
window.onnxlrp.ready = (async () => {
  try {
    await openSession();
  } catch (err) {
    $('status').textContent = `error: the model does not load (${err.message})`;
    $('status').className = 'error';
    throw err;
  }
  window.onnxlrp.backend = backend;
  $('backend').textContent = backend === 'webgpu' ? 'WebGPU' : 'WebAssembly (CPU)';
  $('status').textContent = channels === 1 && config.pad ? 'ready: draw a digit, or drop an image' : 'ready: drop an image';
  if (config.pad) { $('pad-box').hidden = false; setUpPad(); }
  setUpFiles();
  return backend;
})();
