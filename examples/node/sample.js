// Sample images from an ldmkit ONNX artifact with onnxruntime-node: ONE session.run of sampler.onnx
// (DDIM or DPM-Solver++(2M) + classifier-free guidance + VAE decoder), no scheduler code here.
//
//   npm install --onnxruntime-node-install=skip     # the CPU build, from the npm registry only
//   node sample.js ARTIFACT_DIR NOISE.npy OUT.png [--class K] [--guidance W] [--steps N] [--sampler ddim|dpmpp2m]
//
// NOISE.npy: x_T as float32 (N, C, H, W), e.g. np.save("noise.npy", rng.standard_normal((8, 4, 8, 8), np.float32)).
// Writes OUT.png (a grid) and OUT.png.f32 (the images, raw little-endian float32 (N, c, H', W') in [0, 1], where
// [c, H', W'] is sampler.json's model.image_shape: the data's own size, e.g. 1×28×28 for the digits).
"use strict";
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const zlib = require("zlib");
const ort = require("onnxruntime-node");

function readNpy(file) {  // a little-endian float32, C-order .npy (format 1.0 or 2.0)
  const buf = fs.readFileSync(file);
  if (buf.toString("latin1", 0, 6) !== "\x93NUMPY") throw new Error(`${file} is not a .npy file`);
  const v1 = buf[6] === 1;
  const headerLen = v1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (v1 ? 10 : 12) + headerLen;
  const header = buf.toString("latin1", v1 ? 10 : 12, start);
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`${file} must hold little-endian float32 in C order, got header ${header.trim()}`);
  }
  const dims = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + start, buf.byteOffset + buf.length));
  return { data, dims };
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {
  const body = Buffer.concat([Buffer.from(type, "latin1"), data]);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

function gridPng(images, [n, c, h, w], nrow, pad = 2) {  // grey or RGB 8-bit PNG of a grid, as ldmkit.images
  nrow = Math.max(1, Math.min(nrow, n));
  const rows = Math.ceil(n / nrow);
  const H = rows * (h + pad) + pad;
  const W = nrow * (w + pad) + pad;
  const raw = Buffer.alloc(H * (1 + W * c));  // each row: filter byte 0, then pixels (black background)
  for (let i = 0; i < n; i++) {
    const top = pad + Math.floor(i / nrow) * (h + pad);
    const left = pad + (i % nrow) * (w + pad);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let ch = 0; ch < c; ch++) {
          const v = images[((i * c + ch) * h + y) * w + x];
          raw[(top + y) * (1 + W * c) + 1 + (left + x) * c + ch] = Math.round(Math.min(1, Math.max(0, v)) * 255);
        }
      }
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(W, 0);
  ihdr.writeUInt32BE(H, 4);
  ihdr.set([8, c === 1 ? 0 : 2, 0, 0, 0], 8);
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), pngChunk("IHDR", ihdr),
    pngChunk("IDAT", zlib.deflateSync(raw, { level: 9 })), pngChunk("IEND", Buffer.alloc(0))]);
}

function option(args, name, fallback) {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : fallback;
}

async function main(argv) {
  const [dir, noiseFile, out] = argv;
  if (!dir || !noiseFile || !out) {
    throw new Error("usage: node sample.js ARTIFACT_DIR NOISE.npy OUT.png [--class K] [--guidance W] [--steps N] " +
                    "[--sampler ddim|dpmpp2m]");
  }
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, "sampler.json"), "utf8"));
  const { model, files } = manifest;
  const bytes = fs.readFileSync(path.join(dir, files.sampler.path));
  if (crypto.createHash("sha256").update(bytes).digest("hex") !== files.sampler.sha256) {
    throw new Error(`${files.sampler.path} does not match the sha256 in sampler.json`);
  }
  const noise = readNpy(noiseFile);
  const n = noise.dims[0];
  const steps = option(argv, "--steps", model.defaults.steps);
  const named = argv.indexOf("--sampler");
  const sampler = named >= 0 ? argv[named + 1] : model.defaults.sampler;
  const method = model.graph_samplers.indexOf(sampler);  // sampler.onnx's method input: its index there
  if (method < 0) throw new Error(`sampler.onnx runs ${model.graph_samplers.join(", ")}, not ${sampler}`);
  const feeds = {
    noise: new ort.Tensor("float32", noise.data, noise.dims),
    steps: new ort.Tensor("int64", BigInt64Array.from([BigInt(steps)]), []),
    method: new ort.Tensor("int64", BigInt64Array.from([BigInt(method)]), []),
  };
  const k = model.num_classes;
  if (k > 0) {  // conditional: class ids (default 0, 1, ..., K-1 in turn) and the guidance scale w
    const cls = option(argv, "--class", null);
    feeds.y = new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, i) => BigInt(cls ?? i % k)), [n]);
    feeds.guidance = new ort.Tensor("float32", Float32Array.from([option(argv, "--guidance", model.defaults.guidance)]), []);
  }
  const session = await ort.InferenceSession.create(bytes);
  const { images } = await session.run(feeds);
  fs.writeFileSync(`${out}.f32`, Buffer.from(images.data.buffer, images.data.byteOffset, images.data.byteLength));
  fs.writeFileSync(out, gridPng(images.data, images.dims, k > 0 ? k : 8));
  console.log(`wrote ${out} and ${out}.f32: images ${JSON.stringify(images.dims)} float32 in [0, 1], ` +
              `${sampler} ${steps} steps`);
}

main(process.argv.slice(2)).catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(2);
});
