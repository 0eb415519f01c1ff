"""examples/web: the page samples in headless Chromium with onnxruntime-web's wasm backend and gives Python's
images on the same noise (float32 and float64 graphs, both methods, a step count that does not divide T), and
answers every bad input with a message on the page and no uncaught exception.

Installs onnxruntime-web and puppeteer-core from the npm registry into a copy of the example, serves it with
the example's own serve.py (cross-origin isolated: the page must report it and run wasm threads) and drives it
with the example's shot.js, pointed at the system's Chromium (tests/conftest.py: ``chromium()``)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import chromium, one_torch_thread

from ldmkit.export.onnx_export import export_onnx
from ldmkit.export.runtime import OnnxSampler

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "web"


@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory):
    """(page URL, {precision: artifact folder}, the work folder): the example installed into a copy, serving
    /model/ (float32 export) and /model64/ (a float64 export placed inside the served folder)."""
    work = tmp_path_factory.mktemp("web")
    shutil.copytree(EXAMPLE, work / "web", ignore=shutil.ignore_patterns("node_modules", "*.png", "*.f32"))
    work = work / "web"
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=work, capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    with one_torch_thread():
        f32 = export_onnx(tiny_checkpoints["cond"], work / "artifact32", steps=6, precision="float32",
                          log=lambda line: None)
        f64 = export_onnx(tiny_checkpoints["cond"], work / "model64", steps=6, log=lambda line: None)
    server = subprocess.Popen([sys.executable, "serve.py", str(f32), "--port", "0"], cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line + server.stderr.read()
        yield line.split()[1], {"float32": f32, "float64": f64}, work
    finally:
        server.terminate()
        server.wait(timeout=30)


def drive(served, query: str, images: Path | None = None) -> dict:
    url, _, work = served
    args = ["node", "shot.js", f"{url}?{query}", "--browser", chromium(), "--timeout", "240"]
    run = subprocess.run(args + (["--images", str(images)] if images else []), cwd=work, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["pageErrors"] == [], result  # nothing left uncaught, whatever the input
    return result


@pytest.mark.node
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("precision, model, sampler, steps, guidance", [
    ("float32", "model/", "ddim", 6, 2.5),
    ("float32", "model/", "dpmpp2m", 7, 1.5),  # 7 does not divide T = 50
    ("float64", "model64/", "dpmpp2m", 5, 3.0),
])
def test_page_matches_python(served, precision, model, sampler, steps, guidance):
    _, folders, work = served
    runner = OnnxSampler(folders[precision], provider="cpu")
    noise, _ = runner.noise(12, steps, seed=7, loop=False)
    np.save(work / f"noise-{precision}.npy", noise)
    out = work / "images.f32"
    result = drive(served, f"run=1&model={model}&classes=0-5&per=2&sampler={sampler}&steps={steps}"
                           f"&guidance={guidance}&noise=noise-{precision}.npy", out)
    assert result["state"] == "done" and result["shown"] == "", result
    assert result["isolated"] is True and " images/s on wasm, " in result["status"]  # COOP/COEP took effect
    labels = np.arange(12) % 6
    assert result["labels"] == labels.tolist() and result["dims"] == [12, *runner.model.image_shape]
    web = np.fromfile(out, "<f4").reshape(result["dims"])
    python = runner.sample(12, labels, sampler, steps=steps, guidance=guidance, noise=(noise, None))
    graph = runner.sample_graph(12, labels, steps=steps, guidance=guidance, noise=(noise, None), sampler=sampler)
    assert np.abs(web - graph).max() <= 1e-5
    assert np.abs(web - python).max() <= 1e-4
    assert np.abs(web - python).max() < 0.01 * np.abs(python - 0.5).max()  # the comparison is not vacuous


@pytest.mark.node
@pytest.mark.browser
@pytest.mark.slow
def test_page_says_what_is_wrong(served):
    _, folders, work = served
    tampered = work / "tampered"
    shutil.copytree(folders["float32"], tampered)
    manifest = json.loads((tampered / "sampler.json").read_text())
    manifest["files"]["sampler"]["sha256"] = "0" * 64
    (tampered / "sampler.json").write_text(json.dumps(manifest))
    (work / "notanexport").mkdir()
    (work / "notanexport" / "sampler.json").write_text('{"format": {"name": "something-else"}}')
    cases = {
        "model=nowhere/": "HTTP 404: not an ldmkit export folder",
        "model=notanexport/": "is not an ldmkit ONNX manifest",
        "model=tampered/": "sampler.onnx does not match the sha256 in sampler.json",
        "sampler=euler": 'unknown sampler "euler": sampler.onnx runs ddim, dpmpp2m',
        "steps=0": "steps must be an integer in 1..50",
        "steps=51": "steps must be an integer in 1..50",
        "classes=3,10": "class 10 is out of range: this model has classes 0..9",
        "classes=x": 'classes: "x" is not a class id',
        "guidance=-1": "guidance must be a number in 0..",
        "per=1000": "10000 images asked for; this page samples at most 256",
        "noise=nowhere.npy": "noise nowhere.npy: HTTP 404",
    }
    for query, message in cases.items():
        result = drive(served, "run=1&" + query)
        assert result["state"] == "error" and message in result["shown"], (query, result)
        assert result["error"] == result["shown"]
