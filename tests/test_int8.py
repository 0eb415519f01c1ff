"""``ldmkit export onnx --quantize int8`` (export/quantize.py): the int8 artifact (files, manifest, what stays in
float), the Python runtime and sampler.onnx on the same int8 graph and noise, the quality gate passing, and the
gate refusing a deliberately bad quantisation with nothing left behind."""

import json

import numpy as np
import pytest

for _name in ("torch", "onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name)

import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.export import onnx_export as E  # noqa: E402
from ldmkit.export import quantize as Q  # noqa: E402
from ldmkit.export.runtime import OnnxSampler  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def int8_artifact(tiny_checkpoints, tmp_path_factory):
    """The conditional tiny checkpoint exported with an int8 U-Net through the CLI (8 default steps)."""
    out = tmp_path_factory.mktemp("int8") / "onnx8"
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_checkpoints["cond"]), "-o", str(out), "--steps",
                                       "8", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "int8 gate" in result.output and "wrote" in result.output and "WARNING" not in result.output
    return out


def test_int8_artifact_files_manifest_and_float_nodes(int8_artifact, onnx_artifacts):
    assert sorted(p.name for p in int8_artifact.iterdir()) == ["sampler.json", "sampler.onnx", "unet.onnx",
                                                               "vae_decoder.onnx"]
    manifest = json.loads((int8_artifact / "sampler.json").read_text())
    float32 = json.loads((onnx_artifacts["cond"] / "sampler.json").read_text())
    assert manifest["format"]["version"] == 3 and float32["quantization"] is None
    assert manifest["model"] == float32["model"]  # the same model description: the int8 file is unet.onnx
    for role in ("unet", "sampler"):  # same inputs and outputs as the float32 graphs
        assert {k: manifest["files"][role][k] for k in ("inputs", "outputs")} == \
            {k: float32["files"][role][k] for k in ("inputs", "outputs")}
    q = manifest["quantization"]
    assert q["precision"] == "int8" and q["op_types"] == ["Conv", "MatMul"]
    cal = q["calibration"]
    # calibrated on the sampling the artifact runs by default
    assert (cal["sampler"], cal["steps"], cal["images"]) == ("dpmpp2m", 8, 64)
    assert cal["guidance"] == manifest["model"]["defaults"]["guidance"]
    assert cal["timesteps"] == manifest["model"]["defaults"]["timesteps"]
    assert cal["calls"] == 8 and cal["latents"] == 8 * 2 * 64  # one guided call on 2n rows per step
    gate = q["quality"]
    assert gate["passed"] and 0 <= gate["shift"] <= gate["margin"] == Q.GATE_MARGIN and gate["samples"] == 500
    assert gate["fd_int8_float32"] == pytest.approx(gate["shift"] * gate["fd_float32_floor"])

    graph = onnx.load(int8_artifact / "unet.onnx").graph
    weights = {t.name: t for t in graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    int8_weights = [name for name, t in weights.items() if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights and all(weights[name].dims for name in int8_weights)
    kept = set(q["float_nodes"])
    convs = [n for n in graph.node if n.op_type in ("Conv", "MatMul")]
    quantised = [n for n in convs if n.input[0] in dequantized]  # its activation comes out of a DequantizeLinear
    assert [n.name for n in quantised] == [n.name for n in convs if n.name not in kept] and quantised
    assert all(dequantized.get(n.input[1]) in int8_weights for n in quantised if n.op_type == "Conv")
    first = next(n for n in graph.node if n.op_type == "Conv" and "x_t" in n.input)
    last = next(n for n in graph.node if n.op_type == "Conv" and "prediction" in n.output)
    assert {first.name, last.name} <= kept and first.input[1] in weights  # float weights, no DequantizeLinear
    embedding = {n.name for n in graph.node if n.op_type in ("Gemm", "Sin", "Cos")}  # the t / y path
    assert embedding and embedding <= kept
    assert not any(n.op_type == "Gemm" and n.input[0] in dequantized for n in graph.node)
    sizes = [(d / "unet.onnx").stat().st_size for d in (int8_artifact, onnx_artifacts["cond"])]
    assert sizes[0] < 0.7 * sizes[1]  # the demo: 11.6 MB → 4.3 MB; here the float embedding weighs more


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_int8_runtime_and_sampler_graph_agree_on_the_same_noise(int8_artifact, onnx_artifacts, sampler):
    """The Python loop on the int8 unet.onnx and the int8 sampler.onnx (the same U-Net graph in its Loop) on the
    same noise: float32 round-off apart, as for float32 (E.TOLERANCE). Both differ from the float32 artifact's
    images (the U-Net is another), but only by what int8 moves."""
    runner = OnnxSampler(int8_artifact, provider="cpu")
    assert runner.precision == "int8" and OnnxSampler(onnx_artifacts["cond"], provider="cpu").precision == "float32"
    n, steps = 6, 8
    x_T = np.random.default_rng(5).standard_normal((n, *runner.latent_shape), dtype=np.float32)
    loop = runner.sample(n, None, sampler, steps, 0.0, 2.0, noise=(x_T, None))
    graph = runner.sample_graph(n, None, steps, 2.0, noise=(x_T, None), sampler=sampler)
    assert np.abs(loop - graph).max() <= E.TOLERANCE
    float32 = OnnxSampler(onnx_artifacts["cond"], provider="cpu").sample(n, None, sampler, steps, 0.0, 2.0,
                                                                        noise=(x_T, None))
    assert 0 < np.abs(loop - float32).max() < 0.5


def test_cli_sample_reports_the_precision(int8_artifact, onnx_artifacts, tmp_path):
    for art, precision in ((int8_artifact, "int8"), (onnx_artifacts["cond"], "float32")):
        for extra in ([], ["--graph"]):
            result = CliRunner().invoke(main, ["sample", str(art), "-n", "3", "--steps", "2", *extra,
                                               "-o", str(tmp_path / "x.npy")])
            assert result.exit_code == 0, result.output
            assert f"{precision} U-Net" in result.output


def test_version_2_manifest_is_refused(onnx_artifacts, tmp_path):
    """An artifact exported before format version 3 (no ``quantization``, no zero-terminal-SNR flag) is refused
    with one line that says to export again."""
    import shutil

    art = tmp_path / "v2"
    shutil.copytree(onnx_artifacts["cond"], art)
    manifest = json.loads((art / "sampler.json").read_text())
    manifest["format"]["version"] = 2
    del manifest["quantization"]
    (art / "sampler.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format version 2 is not supported; .* reads version 3: export the "
                                         r"checkpoint again$"):
        OnnxSampler(art, provider="cpu")


def test_gate_refuses_a_bad_quantisation_and_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    """Calibrated on latents 100× too large, the activation ranges are so wide that most activations round to
    zero: the int8 U-Net's samples move as far as a new noise set moves float32's (shift ≈ 0.9 here, the
    recipe 0.003). The export refuses it in one line naming the figure, exit status 2, and writes nothing."""
    calibration = Q.calibration_feeds
    monkeypatch.setattr(Q, "calibration_feeds",
                        lambda *a, **k: [{**f, "x_t": 100 * f["x_t"]} for f in calibration(*a, **k)])
    monkeypatch.setattr(Q, "GATE_SAMPLES", 300)
    out = tmp_path / "bad"
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_checkpoints["cond"]), "-o", str(out),
                                       "--steps", "8", "--quantize", "int8"])
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: int8 U-Net refused: quantisation moves its samples by ")
    assert f"beyond the margin of {Q.GATE_MARGIN:.2f}" in error and "Traceback" not in result.output
    assert float(error.split(" moves its samples by ")[1].split()[0]) > Q.GATE_MARGIN
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantize_bad_value(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"quantize must be one of \['int8'\] or None, got 'int4'"):
        E.export_onnx(tiny_checkpoints["cond"], tmp_path / "x", quantize="int4", log=lambda line: None)
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_checkpoints["cond"]), "-o", str(tmp_path / "y"),
                                       "--quantize", "int4"])
    assert result.exit_code == 2 and "int4" in result.output and not (tmp_path / "y").exists()


def test_unconditional_int8_export(tiny_checkpoints, tmp_path, monkeypatch):
    """No labels, no guidance, v-prediction, opset 20, a float32 loop: calibration on unguided calls (n rows),
    the gate passes, and sampler.onnx's float32 loop keeps to the Python loop on the mean (INT8_FLOAT32_LOOP_MEAN)."""
    monkeypatch.setattr(Q, "GATE_SAMPLES", 200)
    out = E.export_onnx(tiny_checkpoints["uncond"], tmp_path / "u8", opset=20, steps=5, precision="float32",
                        quantize="int8", log=lambda line: None)
    q = json.loads((out / "sampler.json").read_text())["quantization"]
    assert q["calibration"]["guidance"] is None and q["calibration"]["latents"] == 5 * 64
    assert q["quality"]["passed"] and q["quality"]["samples"] == 200
    assert q["sampler_check"]["mean_abs_error"] <= E.INT8_FLOAT32_LOOP_MEAN
    runner = OnnxSampler(out, provider="cpu")
    x_T = np.random.default_rng(2).standard_normal((3, *runner.latent_shape), dtype=np.float32)
    loop = runner.sample(3, None, "dpmpp2m", 5, noise=(x_T, None))
    graph = runner.sample_graph(3, None, 5, noise=(x_T, None))
    assert runner.precision == "int8" and loop.shape == graph.shape == (3, 1, 32, 32)
    assert np.abs(loop - graph).mean() <= E.INT8_FLOAT32_LOOP_MEAN
