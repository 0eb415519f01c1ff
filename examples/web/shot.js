// Drive the page in headless Chromium (the system's browser, through puppeteer-core; nothing downloads one):
//
//   node shot.js URL [--screenshot PAGE.png] [--images OUT.f32] [--browser /usr/bin/chromium] [--timeout SECONDS]
//
// Opens URL (the page with ?run=1&...), waits until the page has sampled or said what is wrong, and prints one
// JSON line: {state, error, dims, labels, seconds, status, isolated, pageErrors}. --images writes the images as
// raw little-endian float32 (N, C, H, W); --screenshot saves the whole page. Exit 0 when the page finished
// (even with an error message on it), 2 when it could not be driven.
import fs from "node:fs";
import puppeteer from "puppeteer-core";

function option(args, name, fallback) {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
}

async function main(argv) {
  const url = argv[0];
  if (!url || url.startsWith("--")) throw new Error("usage: node shot.js URL [--screenshot PAGE.png] [--images OUT.f32]");
  const browser = await puppeteer.launch({
    executablePath: option(argv, "--browser", process.env.CHROMIUM ?? "/usr/bin/chromium"),
    headless: true,
    // As root Chromium needs --no-sandbox; the rest keep it from reaching for Google's services.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1000, height: 760 });
    const pageErrors = [];
    page.on("pageerror", (err) => pageErrors.push(String(err?.message ?? err)));
    await page.goto(url, { waitUntil: "load" });
    const timeout = 1000 * Number(option(argv, "--timeout", "300"));
    await page.waitForFunction(() => ["done", "error"].includes(window.ldmkit?.state), { timeout, polling: 100 });
    const result = await page.evaluate(() => {
      const r = window.ldmkit;
      const bytes = r.images ? new Uint8Array(r.images.buffer, r.images.byteOffset, r.images.byteLength) : null;
      let binary = "";
      for (let i = 0; bytes && i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      return { state: r.state, error: r.error ?? null, dims: r.dims ?? null, labels: r.labels ?? null,
        seconds: r.seconds ?? null, status: document.getElementById("status").textContent,
        shown: document.getElementById("error").textContent, isolated: self.crossOriginIsolated,
        images: bytes ? btoa(binary) : null };
    });
    const images = option(argv, "--images", null);
    if (images && result.images) fs.writeFileSync(images, Buffer.from(result.images, "base64"));
    const screenshot = option(argv, "--screenshot", null);
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
    delete result.images;
    console.log(JSON.stringify({ ...result, pageErrors }));
  } finally {
    await browser.close();
  }
}

main(process.argv.slice(2)).catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(2);
});
