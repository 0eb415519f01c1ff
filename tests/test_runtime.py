"""The torch-free runtime (ldmkit.export.runtime) and `ldmkit sample DIR`: it imports and samples with torch
unimportable, refuses tampered, swapped or edited artifacts and bad arguments with one line (exit status 2
from the CLI) and no output, and reports the provider that actually runs."""

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.export import runtime as rt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TORCH = textwrap.dedent("""
    import sys

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "onnx", "onnxscript"}:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, _Blocker())
""")


def run_blocked(code: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where torch, onnx and onnxscript cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture()
def artifact(onnx_artifacts, tmp_path):
    """A private copy of the conditional artifact, free to tamper with."""
    return Path(shutil.copytree(onnx_artifacts["cond"], tmp_path / "art"))


def test_runtime_samples_with_torch_unimportable(onnx_artifacts):
    proc = run_blocked("""
        import sys
        import numpy as np
        from ldmkit.export.runtime import OnnxSampler
        s = OnnxSampler(sys.argv[1])
        images = s.sample(4, labels=[0, 1, 2, 3], steps=3, guidance=2.0, seed=1)
        graph = s.sample_graph(4, labels=[0, 1, 2, 3], steps=3, guidance=2.0, seed=1)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "onnx", "onnxscript"})
        print(images.shape, images.dtype, s.provider, float(np.abs(images - graph).max()) < 1e-4, heavy)
    """, onnx_artifacts["cond"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(4, 1, 27, 22) float32 cpu True []"  # the data's size (conftest)


def test_cli_sample_from_folder_with_torch_unimportable(onnx_artifacts, tmp_path):
    main_code = "import runpy; sys.argv = ['ldmkit', *sys.argv[1:]]; runpy.run_module('ldmkit', run_name='__main__')"
    png, npy = tmp_path / "x.png", tmp_path / "x.npy"
    proc = run_blocked(main_code, "sample", onnx_artifacts["cond"], "-n", "12", "--steps", "3", "-o", png)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "onnxruntime, cpu" in proc.stdout
    proc = run_blocked(main_code, "sample", onnx_artifacts["uncond"], "-n", "3", "--sampler", "heun", "--steps", "4",
                       "-o", npy)
    assert proc.returncode == 0, proc.stderr
    images = np.load(npy)
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1


def test_python_example_runs_with_torch_unimportable(onnx_artifacts, tmp_path):
    script = ROOT / "examples" / "python" / "sample.py"
    assert len(script.read_text().splitlines()) <= 30
    proc = run_blocked(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
                       onnx_artifacts["cond"], tmp_path / "digits.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "digits.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_and_explicit_noise(onnx_artifacts):
    s = rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu")
    a = s.sample(3, labels=4, steps=4, guidance=3.0, seed=11)
    np.testing.assert_array_equal(a, s.sample(3, labels=4, steps=4, guidance=3.0, seed=11))
    assert np.abs(a - s.sample(3, labels=4, steps=4, guidance=3.0, seed=12)).max() > 1e-3
    x_T, _ = s.noise(3, 4, seed=11, loop=False)
    np.testing.assert_array_equal(a, s.sample(3, labels=4, steps=4, guidance=3.0, seed=99, noise=(x_T, None)))
    x_T, loop = s.noise(3, 4, seed=2)
    b = s.sample(3, labels=4, sampler="ddim", steps=4, eta=1.0, noise=(x_T, loop))
    assert np.abs(b - s.sample(3, labels=4, sampler="ddim", steps=4, eta=1.0, noise=(x_T, loop + 1))).max() > 1e-3


def test_row_slices_cover_the_rows_in_order_with_sizes_one_apart():
    for n in range(1, 40):
        for parts in range(1, 9):
            slices = rt.row_slices(n, parts)
            sizes = [s.stop - s.start for s in slices]
            assert len(slices) == min(n, parts) and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert np.array_equal(np.concatenate([np.arange(n)[s] for s in slices]), np.arange(n))


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_calls_run_as_row_slices_on_the_threads_and_give_the_same_images(onnx_artifacts, name, monkeypatch):
    """A call of B rows runs as min(threads, B) slices, on the pool's threads, and the images do not depend
    on how the rows were cut: one thread against three, through the U-Net loop, the decoder and sampler.onnx."""
    one = rt.OnnxSampler(onnx_artifacts[name], provider="cpu", threads=1)
    three = rt.OnnxSampler(onnx_artifacts[name], provider="cpu", threads=3)
    assert (one.threads, three.threads) == (1, 3)
    labels = None if name == "uncond" else 7
    guidance = None if name == "uncond" else 2.0
    x_T, loop = one.noise(7, 4, seed=3)
    calls = []
    run_once = rt.OnnxSampler._run_once

    def spy(self, session, role, outputs, feeds):
        calls.append((role, len(next(iter(feeds.values()))), threading.current_thread().name))
        return run_once(self, session, role, outputs, feeds)

    monkeypatch.setattr(rt.OnnxSampler, "_run_once", spy)
    for method in ("ddpm", "dpmpp2m"):
        noise = (x_T, loop if method == "ddpm" else None)
        a = one.sample(7, labels, method, 4, 0.0, guidance, noise=noise)
        b = three.sample(7, labels, method, 4, 0.0, guidance, noise=noise)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    a = one.sample_graph(7, labels, 4, guidance, noise=(x_T, None))
    calls.clear()
    b = three.sample_graph(7, labels, 4, guidance, noise=(x_T, None))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert sorted(rows for _, rows, _ in calls) == [2, 2, 3]
    assert all(thread.startswith("ldmkit-ort") for *_, thread in calls)
    calls.clear()
    three.decode(np.zeros((2, *three.latent_shape), np.float32))
    assert [rows for _, rows, _ in calls] == [1, 1]


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(onnx_artifacts, threads):
    with pytest.raises(ValueError, match="threads must be a positive integer or None"):
        rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu", threads=threads)


def test_labels_default_to_all_classes_in_turn(onnx_artifacts):
    s = rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu")
    np.testing.assert_array_equal(s.labels(12), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(s.labels(3, 7), [7, 7, 7])
    assert rt.OnnxSampler(onnx_artifacts["uncond"], provider="cpu").labels(3) is None


@pytest.mark.parametrize("name, kwargs, message", [
    ("cond", {"labels": 10}, "class id must be in 0..9, got 10"),
    ("cond", {"labels": [0, -1, 2]}, "class id must be in 0..9, got -1"),
    ("cond", {"labels": [0, 1]}, "labels must be a class id or 3 integer class ids"),
    ("cond", {"labels": [0.5, 1, 2]}, "labels must be a class id or 3 integer class ids"),
    ("uncond", {"labels": 1}, "labels were given but the model is unconditional"),
    ("uncond", {"guidance": 3.0}, "guidance was given but the model is unconditional"),
    ("cond", {"guidance": -1.0}, "guidance must be >= 0"),
    ("cond", {"steps": 51}, "steps must be in 1..50"),
    ("cond", {"steps": 0}, "steps must be in 1..50"),
    ("cond", {"sampler": "euler_a"}, "sampler must be one of"),
    ("cond", {"sampler": "heun", "eta": 0.5}, "eta applies to the ddim sampler only"),
    ("cond", {"eta": -0.1}, "eta must be >= 0"),
    ("cond", {"noise": (np.zeros((3, 2, 8, 8), np.float32), None), "sampler": "ddpm"}, "needs loop noise"),
    ("cond", {"noise": (np.zeros((3, 2, 4, 4), np.float32), None)}, "x_T must have shape (3, 2, 8, 8)"),
])
def test_bad_arguments_name_the_argument(onnx_artifacts, name, kwargs, message):
    s = rt.OnnxSampler(onnx_artifacts[name], provider="cpu")
    with pytest.raises(ValueError, match=None) as info:
        s.sample(3, **{"steps": 2, **kwargs})
    assert message in str(info.value)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        s.sample(0)


def _edit(path: Path, edit) -> None:
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _rehash(art: Path) -> None:
    def fix(m):
        for entry in m["files"].values():
            entry["sha256"] = rt.sha256_bytes((art / entry["path"]).read_bytes())
    _edit(art / "sampler.json", fix)


def _swap(art: Path, a: str, b: str) -> None:
    (art / a).rename(art / "tmp")
    (art / b).rename(art / a)
    (art / "tmp").rename(art / b)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_weight(path: Path) -> None:
    """One weight of the model changed (a valid model, as an editor would leave it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, path)


def _edit_node(path: Path) -> None:
    """The first Add of the model made a Sub (a valid model that computes something else)."""
    import onnx

    model = onnx.load(path)
    next(n for n in model.graph.node if n.op_type == "Add").op_type = "Sub"
    onnx.save(model, path)


def _retag(art: Path, edit) -> None:
    """sampler.json edited, each model's ldmkit digest metadata set to the edited model's, files re-hashed:
    consistent, as a careful forger would leave it."""
    import onnx

    from ldmkit.common import from_dict
    from ldmkit.export import manifest as M

    _edit(art / "sampler.json", edit)
    digest = M.model_digest(from_dict(M.Model, json.loads((art / "sampler.json").read_text())["model"], "model"))
    for name in M.FILES.values():
        model = onnx.load(art / name)
        for prop in model.metadata_props:
            if prop.key == rt.META_DIGEST:
                prop.value = digest
        onnx.save(model, art / name)
    _rehash(art)


def _cross(art: Path, other: Path) -> None:  # the unconditional export's files under the conditional manifest
    for name in ("unet.onnx", "vae_decoder.onnx", "sampler.onnx"):
        shutil.copy(other / name, art / name)
    _rehash(art)


TAMPERING = {
    "T edited": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(T=60)),
                 "model.alpha_bars is not the 'linear' schedule with T = 60"),
    "alpha_bar edited": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"]["alpha_bars"].__setitem__(
        5, 0.5)), "model.alpha_bars is not the 'linear' schedule"),
    "class count edited": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(
        num_classes=5, null_class=5)), "was exported with another model description"),
    "latent scale edited": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(latent_scale=2.0)),
                            "was exported with another model description"),
    "prediction edited": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(prediction="v")),
                          "was exported with another model description"),
    "key removed": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].pop("prediction")),
                    "model is missing key(s) ['prediction']"),
    "wrong type": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(T="50")),
                   "model.T must be an int in 1..10000"),
    "image shape edited": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(
        image_shape=[1, 32, 32])), "files.vae_decoder.outputs must be one output of shape ['batch', 1, 32, 32]"),
    "format version": (lambda art, o: _edit(art / "sampler.json", lambda m: m["format"].update(version=4)),
                       "format version 4 is not supported"),
    "not json": (lambda art, o: (art / "sampler.json").write_text("{"), "sampler.json is not valid JSON"),
    "not a manifest": (lambda art, o: (art / "sampler.json").write_text("[1, 2]"), "is not an ldmkit ONNX manifest"),
    "declared input renamed": (lambda art, o: _edit(art / "sampler.json", lambda m: m["files"]["unet"]["inputs"][0]
                                                    .update(name="x")), "differ from those sampler.json declares"),
    "unet tampered": (lambda art, o: _flip_byte(art / "unet.onnx"), "unet.onnx does not match the sha256"),
    "decoder tampered": (lambda art, o: _flip_byte(art / "vae_decoder.onnx"),
                         "vae_decoder.onnx does not match the sha256"),
    "sampler tampered": (lambda art, o: _flip_byte(art / "sampler.onnx"), "sampler.onnx does not match the sha256"),
    "files swapped": (lambda art, o: _swap(art, "unet.onnx", "vae_decoder.onnx"), "does not match the sha256"),
    "swapped, rehashed": (lambda art, o: (_swap(art, "unet.onnx", "sampler.onnx"), _rehash(art)),
                          "sampler.onnx does not carry the weights and nodes of unet.onnx"),
    # issues 12 and 13: edited and consistently re-hashed folders that crashed at load or ran on other weights
    "T 1e10": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(T=10**10)),
               "model.T must be an int in 1..10000, got 10000000000"),
    "T 2**63": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(T=2**63)),
                "model.T must be an int in 1..10000"),
    "guidance 1e30": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"]["defaults"].update(
        guidance=1e30)), "model.defaults.guidance must be a float in [0, 100] or null"),
    "latent scale inf": (lambda art, o: _edit(art / "sampler.json", lambda m: m["model"].update(latent_scale=1e400)),
                         "model.latent_scale must be a float in [1e-06, 1e+06]"),
    "nested 100,000 deep": (lambda art, o: (art / "sampler.json").write_text("[" * 100_000 + "]" * 100_000),
                            "sampler.json nests lists/objects more than 64 deep"),
    "latent shape edited, re-tagged": (lambda art, o: _retag(art, lambda m: m["model"].update(latent_shape=[2, 4, 4])),
                                       "model.latent_shape [2, 4, 4] is not the shape unet.onnx takes ([2, 8, 8])"),
    "sampler.onnx cut, rehashed": (lambda art, o: (_cut(art / "sampler.onnx"), _rehash(art)),
                                   "sampler.onnx is not a valid ONNX model"),
    "decoder weight edited, rehashed": (lambda art, o: (_edit_weight(art / "vae_decoder.onnx"), _rehash(art)),
                                        "sampler.onnx does not carry the weights and nodes of vae_decoder.onnx"),
    "unet node edited, rehashed": (lambda art, o: (_edit_node(art / "unet.onnx"), _rehash(art)),
                                   "sampler.onnx does not carry the weights and nodes of unet.onnx (first difference: "
                                   "'node "),
    "unet weight edited, rehashed": (lambda art, o: (_edit_weight(art / "unet.onnx"), _rehash(art)),
                                     "sampler.onnx does not carry the weights and nodes of unet.onnx"),
    "other export's files": (lambda art, o: _cross(art, o),  # (its cosine T = 40 tables, under linear T = 50)
                             "sampler.onnx: its alpha_bars table (main/c1) is not the one sampler.json's schedule "
                             "gives (linear, T = 50)"),
    "file missing": (lambda art, o: (art / "vae_decoder.onnx").unlink(), "vae_decoder.onnx is missing"),
    "manifest missing": (lambda art, o: (art / "sampler.json").unlink(), "is a folder without sampler.json"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_artifacts_are_refused(artifact, onnx_artifacts, tmp_path, case):
    tamper, message = TAMPERING[case]
    tamper(artifact, onnx_artifacts["uncond"])
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        rt.OnnxSampler(artifact, provider="cpu")
    assert message in str(info.value)
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["sample", str(artifact), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_metadata_role_is_checked(artifact):
    """Two graphs with the same inputs and outputs but another role (a re-tagged copy) are told apart."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(artifact / "unet.onnx")
    for prop in proto.metadata_props:
        if prop.key == rt.META_ROLE:
            prop.value = "vae_decoder"
    onnx.save(proto, artifact / "unet.onnx")
    _rehash(artifact)
    with pytest.raises(ValueError, match="is the artifact's 'vae_decoder' model, not its 'unet' model"):
        rt.OnnxSampler(artifact, provider="cpu")


@pytest.mark.parametrize("name, args, message", [
    ("cond", ["--class", "10"], "class id must be in 0..9"),
    ("uncond", ["--class", "1", "--steps", "4"], "the model is unconditional"),
    ("uncond", ["--guidance", "2", "--steps", "4"], "guidance was given but the model is unconditional"),
    ("cond", ["--steps", "51"], "steps must be in 1..50"),
    ("cond", ["--sampler", "euler_a"], "sampler must be one of"),
    ("cond", ["--eta", "0.5", "--sampler", "dpmpp2m"], "eta applies to the ddim sampler only"),
    ("cond", ["--device", "cuda"], "cuda"),
])
def test_cli_sample_folder_bad_arguments(onnx_artifacts, tmp_path, name, args, message):
    if args == ["--device", "cuda"] and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["sample", str(onnx_artifacts[name]), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_sample_missing_folder(tmp_path):
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "nothing"), "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and "does not exist" in result.output and not (tmp_path / "g.png").exists()


def test_providers(onnx_artifacts):
    with pytest.raises(ValueError, match="provider must be one of"):
        rt.OnnxSampler(onnx_artifacts["cond"], provider="gpu")
    assert rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu").provider == "cpu"
    auto = rt.OnnxSampler(onnx_artifacts["cond"], provider="auto")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if not has_cuda:
        assert auto.provider == "cpu"
        with pytest.raises(ValueError, match="provider 'cuda' was asked"):
            rt.OnnxSampler(onnx_artifacts["cond"], provider="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_cuda_listed_but_not_loadable_is_refused(onnx_artifacts, tmp_path, monkeypatch):
    """onnxruntime-gpu on a machine without CUDA lists CUDAExecutionProvider, then runs the session on the CPU
    (seen with onnxruntime-gpu 1.31.1 here: "libcublasLt.so.13: cannot open shared object file"). Listing it
    on this CPU build gives the same session: 'cuda' must fail, 'auto' must say it runs on the CPU."""
    real = ort.get_available_providers()
    if "CUDAExecutionProvider" in real:
        pytest.skip("this onnxruntime has CUDA: the fallback cannot be staged")
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.raises(ValueError, match=r"could not load its CUDA provider \(the session runs on "
                                         r"\['CPUExecutionProvider'\]\); refusing to fall back to CPU"):
        rt.OnnxSampler(onnx_artifacts["cond"], provider="cuda")
    assert rt.OnnxSampler(onnx_artifacts["cond"], provider="auto").provider == "cpu"
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["sample", str(onnx_artifacts["cond"]), "-o", str(out), "--device", "cuda"])
    assert result.exit_code == 2 and "refusing to fall back to CPU" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.gpu
def test_cuda_io_binding_matches_cpu(onnx_artifacts):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    gpu = rt.OnnxSampler(onnx_artifacts["cond"], provider="cuda")
    cpu = rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu")
    assert gpu.provider == "cuda" and gpu.unet.get_providers()[0] == "CUDAExecutionProvider"
    x_T, _ = cpu.noise(6, 5, seed=0, loop=False)
    a = gpu.sample(6, steps=5, guidance=3.0, noise=(x_T, None))
    b = cpu.sample(6, steps=5, guidance=3.0, noise=(x_T, None))
    assert np.abs(a - b).max() <= 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_cli_sample_folder_graph_equals_python_loop(onnx_artifacts, tmp_path, sampler):
    """`ldmkit sample DIR --graph` (one run of sampler.onnx) gives the Python loop's images within 1e-5;
    --graph refuses a sampler the graph does not run, and eta."""
    art, runner = onnx_artifacts["cond"], CliRunner()
    outs = {}
    for graph in (False, True):
        out = tmp_path / f"{sampler}{graph}.npy"
        args = ["sample", str(art), "-n", "6", "--sampler", sampler, "--steps", "7", "--seed", "2", "-o", str(out)]
        result = runner.invoke(main, args + (["--graph"] if graph else []))
        assert result.exit_code == 0, result.output
        outs[graph] = np.load(out)
    assert np.abs(outs[True] - outs[False]).max() <= 1e-5
    for extra, message in ((["--sampler", "heun"], "sampler.onnx runs ['ddim', 'dpmpp2m'], not 'heun'"),
                           (["--eta", "0.5"], "whose samplers have no eta")):
        result = runner.invoke(main, ["sample", str(art), "--graph", "-o", str(tmp_path / "x.png"), *extra])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
