// Sample images in the browser from an ldmkit ONNX artifact with onnxruntime-web: ONE session.run of
// sampler.onnx (DDIM or DPM-Solver++(2M), classifier-free guidance and the VAE decoder in one graph).
//
// The page's fields can also come from the address: ?model=model/&classes=0-9&per=2&sampler=dpmpp2m&steps=10
// &guidance=1.15&seed=0&backend=wasm&run=1 (run=1 samples at once). &noise=URL.npy takes x_T from a float32
// (N, C, H, W) .npy instead of drawing it from the seed (the seeded draw is this page's own, not NumPy's).
// The result is left in window.ldmkit = {state: "done" | "error", error, images, dims, labels, seconds}.

const FORMAT = { name: "ldmkit-onnx", version: 3 };  // 3: zero terminal SNR, guidance rescale, quantization
const MAX_IMAGES = 256;
const MAX_GUIDANCE = 100;
const $ = (id) => document.getElementById(id);
const sessions = new Map();  // one session per (model source, backend)
let folderFiles = null;  // a FileList from the folder picker, or null to fetch from the model URL

class InputError extends Error {}  // what the page says in red: bad input, not a bug

function fail(message) {
  throw new InputError(message);
}

async function readBytes(name) {  // a file of the artifact, from the picked folder or over HTTP
  if (folderFiles) {
    const file = [...folderFiles].find((f) => f.name === name);
    if (!file) fail(`the picked folder has no ${name}: not an ldmkit export folder (ldmkit export onnx writes one)`);
    return new Uint8Array(await file.arrayBuffer());
  }
  const url = new URL(name, new URL($("model").value.replace(/\/?$/, "/"), location.href));
  const response = await fetch(url);
  if (!response.ok) {
    fail(`${url.pathname}: HTTP ${response.status}: not an ldmkit export folder (ldmkit export onnx writes one)`);
  }
  return new Uint8Array(await response.arrayBuffer());
}

async function sha256(bytes) {
  if (!crypto.subtle) fail("this page needs a secure context (http://127.0.0.1 or https) to check SHA-256 hashes");
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function checkManifest(m) {  // the fields this page uses, as ldmkit's runtime reads them (export/manifest.py)
  if (m?.format?.name !== FORMAT.name) fail(`sampler.json is not an ldmkit ONNX manifest (format name "${FORMAT.name}" missing)`);
  if (m.format.version !== FORMAT.version) {
    fail(`sampler.json: format version ${m.format.version} is not supported; this page reads version ${FORMAT.version}`);
  }
  const { model, files } = m;
  const ok = model && Number.isInteger(model.T) && model.T >= 1 && Number.isInteger(model.num_classes) &&
    Array.isArray(model.latent_shape) && model.latent_shape.length === 3 && Array.isArray(model.graph_samplers) &&
    ["float32", "float64"].includes(model.graph_precision) && model.defaults && files?.sampler?.path === "sampler.onnx" &&
    /^[0-9a-f]{64}$/.test(files.sampler.sha256);
  if (!ok) fail("sampler.json lacks model.T, num_classes, latent_shape, graph_samplers, graph_precision or files.sampler");
  return m;
}

async function loadArtifact() {
  const text = new TextDecoder().decode(await readBytes("sampler.json"));
  let raw;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    fail(`sampler.json is not valid JSON (${err.message})`);
  }
  return checkManifest(raw);
}

function parseClasses(text, k) {  // "0-9", "3,3,7" or "5" → class ids, each in 0..k-1
  const ids = [];
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const range = part.match(/^(\d+)\s*-\s*(\d+)$/);
    const [lo, hi] = range ? [Number(range[1]), Number(range[2])] : [Number(part), Number(part)];
    if (!Number.isInteger(lo) || !Number.isInteger(hi) || lo > hi || hi - lo >= MAX_IMAGES) {
      fail(`classes: "${part}" is not a class id or a range like 0-9`);
    }
    for (let c = lo; c <= hi; c++) ids.push(c);
  }
  if (ids.length === 0) fail("classes: give at least one class id, e.g. 0-9");
  const bad = ids.find((c) => c >= k);
  if (bad !== undefined) fail(`class ${bad} is out of range: this model has classes 0..${k - 1}`);
  return ids;
}

function readNpy(bytes, where) {  // a little-endian float32, C-order .npy (format 1.0 or 2.0) → {data, dims}
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") fail(`${where} is not a .npy file`);
  const v1 = bytes[6] === 1;
  const start = (v1 ? 10 : 12) + (v1 ? view.getUint16(8, true) : view.getUint32(8, true));
  const header = new TextDecoder("latin1").decode(bytes.subarray(v1 ? 10 : 12, start));
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    fail(`${where} must hold little-endian float32 in C order, got ${header.trim()}`);
  }
  const dims = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  return { data: new Float32Array(bytes.slice(start).buffer), dims };
}

function gaussianNoise(count, seed) {  // count standard normals: splitmix32 uniforms, Box–Muller
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x9e3779b9) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return ((z ^ (z >>> 16)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - uniform()));
    const a = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(a);
    if (i + 1 < count) out[i + 1] = r * Math.sin(a);
  }
  return out;
}

function readRequest(manifest) {  // the form's fields, checked against the model
  const { model } = manifest;
  const k = model.num_classes;
  const per = Number($("per").value);
  if (!Number.isInteger(per) || per < 1) fail("images per class must be an integer >= 1");
  const classes = k > 0 ? parseClasses($("classes").value, k) : [];
  const labels = k > 0 ? Array.from({ length: classes.length * per }, (_, i) => classes[i % classes.length]) : [];
  const n = k > 0 ? labels.length : per;
  if (n > MAX_IMAGES) fail(`${n} images asked for; this page samples at most ${MAX_IMAGES} at a time`);
  const sampler = $("sampler").value;
  const method = model.graph_samplers.indexOf(sampler);
  if (method < 0) fail(`unknown sampler "${sampler}": sampler.onnx runs ${model.graph_samplers.join(", ")}`);
  const steps = Number($("steps").value);
  if (!Number.isInteger(steps) || steps < 1 || steps > model.T) fail(`steps must be an integer in 1..${model.T}, got ${$("steps").value}`);
  const guidance = Number($("guidance").value);
  if (k > 0 && !(Number.isFinite(guidance) && guidance >= 0 && guidance <= MAX_GUIDANCE)) {
    fail(`guidance must be a number in 0..${MAX_GUIDANCE}, got ${$("guidance").value}`);
  }
  const seed = Number($("seed").value);
  if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) fail("seed must be an integer in 0..4294967295");
  const backend = $("backend").value;
  if (backend === "webgpu" && !navigator.gpu) fail("this browser offers no WebGPU (navigator.gpu is missing): choose wasm");
  if (backend === "webgpu" && model.graph_precision !== "float32") {
    fail("this sampler.onnx computes in float64, which the WebGPU backend cannot run: export with " +
         "`ldmkit export onnx CKPT --precision float32`, or choose wasm");
  }
  return { n, labels, sampler, method, steps, guidance, seed, backend, nrow: k > 0 ? classes.length : Math.min(n, 10) };
}

async function session(manifest, backend) {
  const key = `${folderFiles ? "folder" : $("model").value}|${manifest.files.sampler.sha256}|${backend}`;
  if (!sessions.has(key)) {
    const bytes = await readBytes("sampler.onnx");
    if (await sha256(bytes) !== manifest.files.sampler.sha256) {
      fail("sampler.onnx does not match the sha256 in sampler.json (a changed, partial or foreign file)");
    }
    const ort = await import(backend === "webgpu" ? "./ort/ort.webgpu.min.mjs" : "./ort/ort.wasm.min.mjs");
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const created = await ort.InferenceSession.create(bytes, { executionProviders: [backend] });
    sessions.set(key, { ort, session: created, threads: ort.env.wasm.numThreads });
  }
  return sessions.get(key);
}

async function noiseFor(request, latentShape) {
  const url = new URLSearchParams(location.search).get("noise");
  const want = [request.n, ...latentShape];
  if (!url) return { data: gaussianNoise(want.reduce((a, b) => a * b), request.seed), dims: want };
  const response = await fetch(url);
  if (!response.ok) fail(`noise ${url}: HTTP ${response.status}`);
  const noise = readNpy(new Uint8Array(await response.arrayBuffer()), url);
  if (noise.dims.join() !== want.join()) fail(`noise ${url} has shape [${noise.dims}], the request needs [${want}]`);
  return noise;
}

function draw(images, [n, c, h, w], nrow, scale = 3, pad = 2) {  // the grid of ldmkit.images.make_grid, scaled
  const rows = Math.ceil(n / nrow);
  const width = nrow * (w + pad) + pad;
  const height = rows * (h + pad) + pad;
  const pixels = new ImageData(width, height);
  for (let i = 3; i < pixels.data.length; i += 4) pixels.data[i] = 255;
  for (let i = 0; i < n; i++) {
    const top = pad + Math.floor(i / nrow) * (h + pad);
    const left = pad + (i % nrow) * (w + pad);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const at = 4 * ((top + y) * width + left + x);
        for (let ch = 0; ch < 3; ch++) {
          const v = images[((i * c + Math.min(ch, c - 1)) * h + y) * w + x];
          pixels.data[at + ch] = Math.round(Math.min(1, Math.max(0, v)) * 255);
        }
      }
    }
  }
  const canvas = $("grid");
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = `${width * scale}px`;
  canvas.getContext("2d").putImageData(pixels, 0, 0);
}

async function run() {
  window.ldmkit = { state: "running" };
  $("error").textContent = "";
  $("run").disabled = true;
  try {
    const manifest = await loadArtifact();
    const request = readRequest(manifest);
    $("status").textContent = `loading sampler.onnx on ${request.backend}…`;
    const t0 = performance.now();
    const { ort, session: s, threads } = await session(manifest, request.backend);
    const noise = await noiseFor(request, manifest.model.latent_shape);
    const feeds = {
      noise: new ort.Tensor("float32", noise.data, noise.dims),
      steps: new ort.Tensor("int64", BigInt64Array.from([BigInt(request.steps)]), []),
      method: new ort.Tensor("int64", BigInt64Array.from([BigInt(request.method)]), []),
    };
    if (manifest.model.num_classes > 0) {
      feeds.y = new ort.Tensor("int64", BigInt64Array.from(request.labels, BigInt), [request.n]);
      feeds.guidance = new ort.Tensor("float32", Float32Array.from([request.guidance]), []);
    }
    $("status").textContent = `sampling ${request.n} images: ${request.sampler}, ${request.steps} steps…`;
    const t1 = performance.now();
    const { images } = await s.run(feeds);
    const seconds = (performance.now() - t1) / 1000;
    const data = await images.getData();
    const bad = data.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) fail(`sampler.onnx returned a non-finite value (at ${bad}): the artifact or its inputs are broken`);
    draw(data, images.dims, request.nrow);
    $("status").textContent = `${request.n} images (${request.sampler}, ${request.steps} steps` +
      (manifest.model.num_classes > 0 ? `, guidance ${request.guidance}` : "") + `) in ${seconds.toFixed(2)} s: ` +
      `${(request.n / seconds).toFixed(1)} images/s on ${request.backend}` +
      (request.backend === "wasm" ? `, ${threads} thread${threads > 1 ? "s" : ""}` : "") +
      `; loading took ${((t1 - t0) / 1000).toFixed(2)} s`;
    window.ldmkit = { state: "done", images: data, dims: images.dims, labels: request.labels, seconds };
  } catch (err) {
    const message = err instanceof InputError ? err.message : `${err?.name ?? "Error"}: ${err?.message ?? err}`;
    $("error").textContent = message;
    $("status").textContent = "";
    window.ldmkit = { state: "error", error: message };
  } finally {
    $("run").disabled = false;
  }
}

async function fillDefaults() {  // the sampler list and defaults of the artifact, unless the address set them
  const params = new URLSearchParams(location.search);
  for (const [name, value] of params) if ($(name) && name !== "folder") $(name).value = value;
  try {
    const { model } = await loadArtifact();
    $("sampler").replaceChildren(...model.graph_samplers.map((s) => new Option(s)));
    $("sampler").value = params.get("sampler") ?? model.defaults.sampler;
    if (!params.has("steps")) $("steps").value = model.defaults.steps;
    if (!params.has("guidance")) $("guidance").value = model.defaults.guidance ?? 0;
    $("steps").max = model.T;
    $("classes").disabled = model.num_classes === 0;
    $("guidance").disabled = model.num_classes === 0;
    if (params.has("sampler") && $("sampler").value !== params.get("sampler")) {
      $("sampler").append(new Option(params.get("sampler")));  // kept, so that sampling says it is unknown
      $("sampler").value = params.get("sampler");
    }
  } catch (err) {
    $("error").textContent = err.message;
    window.ldmkit = { state: "error", error: err.message };
    return false;
  }
  return true;
}

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});
$("folder").addEventListener("change", async (event) => {
  folderFiles = event.target.files.length ? event.target.files : null;
  await fillDefaults();
});
window.addEventListener("unhandledrejection", (event) => {  // a bug, not bad input: still say it on the page
  const message = `unexpected: ${event.reason?.message ?? event.reason}`;
  $("error").textContent = message;
  window.ldmkit = { state: "error", error: message };
});

if (await fillDefaults() && new URLSearchParams(location.search).get("run") === "1") await run();
