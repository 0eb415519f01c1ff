"""ONNX export (export/onnx_export.py, export/sampler_graph.py): the artifact's files and manifest, parity of
each graph with the torch modules at two batch sizes, the same images from the same noise through the torch
engine, the NumPy runtime and sampler.onnx, and the export's refusals (no partial output, exit status 2)."""

import json
import shutil

import numpy as np
import pytest

for _name in ("torch", "onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.engine.checkpoint import load_checkpoint  # noqa: E402
from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise  # noqa: E402
from ldmkit.export import onnx_export as E  # noqa: E402
from ldmkit.export import runtime as rt  # noqa: E402
from ldmkit.reference.samplers import SAMPLERS  # noqa: E402
from ldmkit.reference.schedules import Schedule, timesteps  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TOL = 1e-4  # float32 round-off of one model call, relative to max(1, |output|)


@pytest.fixture(scope="module")
def torch_models(tiny_checkpoints):
    return {name: models_from_checkpoint(load_checkpoint(path)) for name, path in tiny_checkpoints.items()}


def test_artifact_files_and_manifest(onnx_artifacts, tiny_checkpoints):
    art = onnx_artifacts["cond"]
    assert art == tiny_checkpoints["cond"].parent / "onnx"
    assert sorted(p.name for p in art.iterdir()) == ["sampler.json", "sampler.onnx", "unet.onnx", "vae_decoder.onnx"]
    manifest = json.loads((art / "sampler.json").read_text())
    model = manifest["model"]
    assert manifest["format"] == {"name": "ldmkit-onnx", "version": 3} and manifest["opset"] == E.DEFAULT_OPSET
    assert model["T"] == 50 and len(model["alpha_bars"]) == 51 and model["alpha_bars"][0] == 1.0
    np.testing.assert_array_equal(model["alpha_bars"], Schedule.named("linear", 50).alpha_bars)
    assert model["defaults"]["timesteps"] == timesteps(8, 50, "trailing").tolist() and model["defaults"]["steps"] == 8
    assert (model["num_classes"], model["null_class"], model["prediction"]) == (10, 10, "eps")
    assert model["latent_shape"] == [2, 8, 8] and model["image_shape"] == [1, 27, 22]  # data.content_size
    for role in ("vae_decoder", "sampler"):
        assert manifest["files"][role]["outputs"][0]["shape"] == ["batch", 1, 27, 22]
    assert [i["name"] for i in manifest["files"]["sampler"]["inputs"]] == ["noise", "y", "guidance", "steps",
                                                                           "method"]
    assert [i["name"] for i in manifest["files"]["unet"]["inputs"]] == ["x_t", "t", "y"]
    for role, entry in manifest["files"].items():
        data = (art / entry["path"]).read_bytes()
        assert rt.sha256_bytes(data) == entry["sha256"]
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto, full_check=True)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert {p.key: p.value for p in proto.metadata_props}[rt.META_ROLE] == role
        assert next(o.version for o in proto.opset_import if o.domain == "") == E.DEFAULT_OPSET
        assert entry["inputs"][0]["shape"][0] == "batch"  # dynamic batch
        assert manifest["parity"]["max_abs_error"][role] <= TOL
    uncond = json.loads((onnx_artifacts["uncond"] / "sampler.json").read_text())
    assert uncond["opset"] == 20 and uncond["model"]["null_class"] is None
    assert uncond["model"]["image_shape"] == [1, 32, 32]  # no data.content_size: no crop
    assert [i["name"] for i in uncond["files"]["unet"]["inputs"]] == ["x_t", "t"]
    assert [i["name"] for i in uncond["files"]["sampler"]["inputs"]] == ["noise", "steps", "method"]


def test_exported_attention_transposes_fold_into_matmuls(onnx_artifacts):
    """The U-Net's attention exports as MatMuls on channel-major views: its only Transposes are a MatMul's
    operand, which ONNX Runtime folds into the MatMul. Standalone Transposes (what scaled_dot_product_attention
    exported) cost ONNX Runtime about 25% of the demo U-Net's time (BENCHMARKS.md). 7 attention blocks here."""
    graph = onnx.load(onnx_artifacts["uncond"] / "unet.onnx").graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    transposes = [node for node in graph.node if node.op_type == "Transpose"]
    assert sum(node.op_type == "Softmax" for node in graph.node) == 7 and len(transposes) == 14
    assert all(consumers[node.output[0]] == ["MatMul"] for node in transposes)


@pytest.mark.parametrize("name, rows, cols", [("cond", slice(2, 29), slice(5, 27)),
                                              ("uncond", slice(0, 32), slice(0, 32))])
def test_unet_and_decoder_match_torch_at_two_batch_sizes(onnx_artifacts, torch_models, name, rows, cols):
    """Independent of the export's own check: other random inputs, batch sizes 1, 2 and 7. The decoder graph
    returns the centre of the torch VAE's 32×32 output at the data's size, sliced here by hand: 27×22 is rows
    2..28 ((32 − 27)//2 = 2, as engine.data._fit pads) and columns 5..26; without content_size, all of it."""
    config, vae, unet = torch_models[name]
    art = onnx_artifacts[name]
    sessions = {r: ort.InferenceSession(str(art / f"{r}.onnx"), providers=["CPUExecutionProvider"])
                for r in ("unet", "vae_decoder")}
    g = torch.Generator().manual_seed(7)
    k, T = config.unet.num_classes, config.diffusion.T
    for b in (1, 2, 7):
        x = torch.randn((b, *config.latent_shape), generator=g) * 2
        t = torch.randint(1, T + 1, (b,), generator=g)
        y = torch.randint(0, k + 1, (b,), generator=g) if k else None
        feeds = {"x_t": x.numpy(), "t": t.numpy(), **({"y": y.numpy()} if k else {})}
        with torch.inference_mode():
            want_u = unet(x, t, y).numpy()
            want_d = ((vae.decode(x * config.latent_scale).clamp(-1, 1) + 1) / 2).numpy()[..., rows, cols]
        got_u = sessions["unet"].run(None, feeds)[0]
        got_d = sessions["vae_decoder"].run(None, {"z": x.numpy()})[0]
        assert np.abs(want_u).max() > 0.1  # a model with real outputs, not the zero-initialised last layer
        assert np.abs(got_u - want_u).max() <= TOL * max(1, np.abs(want_u).max()), b
        assert got_d.shape == (b, 1, rows.stop - rows.start, cols.stop - cols.start), b
        assert np.abs(got_d - want_d).max() <= TOL, b


@pytest.mark.parametrize("name, labels, guidance", [("cond", [3, 0, 9, 5, 5], 3.0), ("cond", [1, 2, 3, 4, 5], None),
                                                    ("uncond", None, None)])
def test_same_noise_same_images_torch_runtime_and_sampler_graph(onnx_artifacts, torch_models, name, labels,
                                                                guidance):
    """DDIM with classifier-free guidance: the torch engine (float32 loop), the NumPy runtime (the reference's
    float64 loop around unet.onnx) and sampler.onnx (float64 loop in one graph) on the same x_T."""
    config, vae, unet = torch_models[name]
    runner = rt.OnnxSampler(onnx_artifacts[name], provider="cpu")
    n, steps = 5, 12
    x_T, loop = sample_noise(config, n, steps, seed=3)
    y = None if labels is None else np.array(labels)
    engine = generate(config, vae, unet, n, y, "ddim", steps, 0.0, guidance, noise=(x_T, loop))
    python = runner.sample(n, y, "ddim", steps, 0.0, guidance, noise=(x_T.numpy(), None))
    graph = runner.sample_graph(n, y, steps, guidance, noise=(x_T.numpy(), None), sampler="ddim")
    assert engine.shape == python.shape == graph.shape == (n, 1, *config.output_size)
    assert config.output_size == ((27, 22) if name == "cond" else (32, 32))
    assert 0.05 < engine.std() and 0 <= graph.min() and graph.max() <= 1
    assert np.abs(python - engine).max() <= TOL
    assert np.abs(graph - python).max() <= TOL
    assert np.abs(graph - engine).max() <= TOL


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("guidance", [2.0, None])
def test_runtime_samplers_match_the_engine_on_the_same_noise(onnx_artifacts, torch_models, sampler, guidance):
    """Every sampler of the table, through the engine (torch tensors) and the runtime (NumPy float64 around
    unet.onnx), on the same noise (η = 0.7 where the sampler takes η)."""
    eta = 0.7 if SAMPLERS[sampler].eta else 0.0
    config, vae, unet = torch_models["cond"]
    runner = rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu")
    n, steps = 4, 10
    x_T, loop = sample_noise(config, n, steps, seed=5)
    y = np.array([7, 1, 0, 4])
    engine = generate(config, vae, unet, n, y, sampler, steps, eta, guidance, noise=(x_T, loop))
    python = runner.sample(n, y, sampler, steps, eta, guidance, noise=(x_T.numpy(), loop.numpy()))
    assert np.abs(python - engine).max() <= TOL


def test_sampler_graph_step_counts_and_clamping(onnx_artifacts):
    """The in-graph trailing table gives the runtime's images at any step count; steps beyond 1..T clamp."""
    runner = rt.OnnxSampler(onnx_artifacts["uncond"], provider="cpu")
    x_T, _ = runner.noise(3, 1, seed=0, loop=False)
    graph = ort.InferenceSession(str(onnx_artifacts["uncond"] / "sampler.onnx"), providers=["CPUExecutionProvider"])
    for steps in (1, 7, 40):
        got = graph.run(None, {"noise": x_T, "steps": np.array(steps), "method": np.array(0)})[0]
        assert np.abs(got - runner.sample(3, sampler="ddim", steps=steps, noise=(x_T, None))).max() <= TOL, steps
    for steps, same in ((0, 1), (500, 40)):
        got = graph.run(None, {"noise": x_T, "steps": np.array(steps), "method": np.array(0)})[0]
        np.testing.assert_array_equal(got, graph.run(None, {"noise": x_T, "steps": np.array(same),
                                                            "method": np.array(0)})[0])


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_sampler_graph_runs_each_method_as_the_python_loop_A2_A5(onnx_artifacts, name):
    """Every method of sampler.onnx (DDIM, DPM-Solver++(2M)) against the reference loop through the Python
    runtime on the same noise, within 1e-5, at step counts that divide T and that do not (1, 2, 7, 13, full)."""
    runner = rt.OnnxSampler(onnx_artifacts[name], provider="cpu")
    assert runner.model.graph_samplers == ("ddim", "dpmpp2m") and all(s in SAMPLERS for s in ("ddim", "dpmpp2m"))
    T = runner.model.T
    y = [3, 0, 9] if name == "cond" else None
    x_T, _ = runner.noise(3, 1, seed=6, loop=False)
    results = {}
    for sampler in runner.model.graph_samplers:
        for steps in (1, 2, 7, 13, T):
            graph = runner.sample_graph(3, y, steps, 2.0 if y else None, noise=(x_T, None), sampler=sampler)
            python = runner.sample(3, y, sampler, steps, 0.0, 2.0 if y else None, noise=(x_T, None))
            assert np.abs(graph - python).max() <= 1e-5, (sampler, steps)
            results[sampler, steps] = graph
    np.testing.assert_array_equal(results["ddim", 1], results["dpmpp2m", 1])  # one step: no multistep term
    assert np.abs(results["ddim", 7] - results["dpmpp2m", 7]).max() > 1e-3  # the 2M correction is used
    with pytest.raises(ValueError, match=r"sampler\.onnx runs"):
        runner.sample_graph(3, y, 5, sampler="heun")


def test_export_fails_above_tolerance_and_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "TOLERANCE", 0.0)
    out = tmp_path / "art"
    with pytest.raises(E.ExportError, match=r"unet does not match the torch model .* max abs error"):
        E.export_onnx(tiny_checkpoints["uncond"], out, steps=5, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_default_folder_force_and_refusals(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoints["uncond"], ckpt)
    runner = CliRunner()
    result = runner.invoke(main, ["export", "onnx", str(ckpt), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert "parity unet" in result.output and "max abs error" in result.output
    art = ckpt.parent / "onnx"
    assert json.loads((art / "sampler.json").read_text())["model"]["defaults"]["steps"] == 5
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    result = runner.invoke(main, ["export", "onnx", str(ckpt)])
    assert result.exit_code == 2 and "--force" in result.output and len(result.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    result = runner.invoke(main, ["export", "onnx", str(ckpt), "--force", "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads((art / "sampler.json").read_text())["model"]["defaults"]["steps"] == 6
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt", "onnx"]  # no temporary folders


def test_cli_export_bad_input(tiny_checkpoints, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cases = [
        ([str(tmp_path / "missing.pt")], "does not exist"),
        ([str(foreign)], "is not an ldmkit checkpoint"),
        ([str(text)], "is not an ldmkit checkpoint"),
        ([str(tiny_checkpoints["uncond"]), "--steps", "41"], "steps must be in 1..40"),
        ([str(tiny_checkpoints["uncond"]), "--opset", "9"], "opset must be in 18.."),
        ([str(tiny_checkpoints["uncond"]), "-o", str(tmp_path / "no" / "such" / "dir")], "does not exist"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["export", "onnx", *args, *([] if "-o" in args else ["-o", str(out)])])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "notes.pt"]


def _float64_items(graph: onnx.GraphProto) -> list[str]:
    """Every float64 thing in a graph and its subgraphs: initializers, Cast targets, typed values."""
    f64 = onnx.TensorProto.DOUBLE
    found = [f"initializer {t.name}" for t in graph.initializer if t.data_type == f64]
    found += [f"value {v.name}" for v in (*graph.input, *graph.output, *graph.value_info)
              if v.type.tensor_type.elem_type == f64]
    for node in graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == f64:
                found.append(f"Cast {node.name} to float64")
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f64:
                found.append(f"constant {node.name}")
            if a.type == onnx.AttributeProto.GRAPH:
                found += _float64_items(a.g)
    return found


def test_float32_sampler_graph_has_no_float64_and_matches_the_python_loop(tiny_checkpoints, onnx_artifacts,
                                                                          tmp_path):
    """`--precision float32`: sampler.onnx holds no float64 tensor (shape inference included) and gives the
    float64 Python loop's images within float32 round-off (1e-4), for each method; sampler.json says so."""
    out = tmp_path / "f32"
    E.export_onnx(tiny_checkpoints["uncond"], out, steps=6, log=lambda line: None, precision="float32")
    graph = onnx.shape_inference.infer_shapes(onnx.load(out / "sampler.onnx")).graph
    assert _float64_items(graph) == []
    assert _float64_items(onnx.shape_inference.infer_shapes(onnx.load(
        onnx_artifacts["uncond"] / "sampler.onnx")).graph)  # the check finds float64 where there is some
    runner = rt.OnnxSampler(out, provider="cpu")
    assert runner.model.graph_precision == "float32"
    x_T, _ = runner.noise(3, 1, seed=8, loop=False)
    for sampler in runner.model.graph_samplers:
        for steps in (6, 40):
            graph_images = runner.sample_graph(3, steps=steps, noise=(x_T, None), sampler=sampler)
            python = runner.sample(3, None, sampler, steps, noise=(x_T, None))
            assert np.abs(graph_images - python).max() <= TOL, (sampler, steps)
    with pytest.raises(ValueError, match="precision must be one of"):
        E.export_onnx(tiny_checkpoints["uncond"], tmp_path / "x", precision="float16")
