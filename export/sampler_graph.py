"""sampler.onnx: DDIM (η = 0) or DPM-Solver++(2M), with classifier-free guidance and the VAE decoder, in ONE
ONNX graph.

Inputs:  noise[B,C,H,W] float32 (x_T), y[B] int64 class ids 0..K−1, guidance[] float32 (w; 1 is plain
         conditional sampling), steps[] int64 (clamped to 1..T), method[] int64 (the index in ``GRAPH_SAMPLERS``:
         0 DDIM, 1 DPM-Solver++(2M); any other value runs DDIM); optional guidance_rescale[] float32 (φ of R3
         in [0, 1], default 0: an input with an initializer, which ONNX Runtime lists among the overridable
         initializers, not the inputs, so hosts that do not know it are unaffected). An unconditional model has
         no y/guidance/guidance_rescale.
Output:  images[B,c,H',W'] float32 in [0, 1], the shape vae_decoder.onnx gives (the data's own size).

The graph computes the "trailing" timestep list t_i = round(T − i·T/steps), i = 0..steps−1 (in float64 as
NumPy does, and ONNX Round and NumPy both round half to even, so it equals
``reference.schedules.timesteps(steps, T, "trailing")``), then runs an ONNX ``Loop`` over it whose body holds
the U-Net's own nodes and weights (unet.onnx inlined, names prefixed ``unet/``): per step ONE U-Net call on
[x, x] with labels [y, null], ε̂ = ε_∅ + w(ε_y − ε_∅) (``reference.samplers.cfg``, A9), R3's rescale of the
guided x̂_0 by the conditional one (``reference.samplers.rescale_guidance``), and the step. ONNX is
a language of its own, so this module states the reference's formulas again, in the reference's own form:
x̂_0 as ``reference.posterior.denoised`` (P3), x_prev = ζ·D + ξ·x_t as ``reference.posterior.ddim_coefficients``
(P6 with η = 0; A2), with D = x̂_0 for DDIM and DPM-Solver++(2M)'s multistep D for the second method, whose
first-order coefficients are exactly DDIM's ξ and ζ (``reference.samplers.dpmpp_2m_sample``, A5). The loop
carries x, the last x̂_0 and the last step size h. tests/test_export.py holds the graph to the reference
loops run by the runtime on the same noise. The loop state is float64 and every coefficient is gathered
from float64 tables of the reference ``Schedule``, as in the NumPy runtime; the U-Net sees x cast to float32.
A zero-terminal-SNR schedule (R2, v- or x0-prediction) needs nothing of its own: at t = T (ᾱ_T = 0) x̂_0 and
ξ, ζ are finite, λ_T = −∞ makes h = +∞ on the first step, where DDIM's form is taken anyway, and the second
step's q = h/(2·h_last) = 0, as in the reference loop.
After the loop, vae_decoder.onnx's nodes (prefixed ``vae_decoder/``) decode z_0.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from ldmkit.reference.schedules import Schedule

from .manifest import GRAPH_SAMPLERS, SAMPLER_TABLES, sampler_tables

F32, F64, I64, BOOL = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
PRECISIONS = ("float64", "float32")


class _Graph:
    """A list of nodes and constant initializers under construction; ``real`` is the NumPy type of its floats."""

    def __init__(self, prefix: str, real=np.float64):
        self.prefix, self.nodes, self.inits, self.count = prefix, [], [], 0
        self.real, self.REAL = real, (F64 if real == np.float64 else F32)

    def const(self, value, dtype, name: str | None = None) -> str:
        self.count += 1
        name = name or f"{self.prefix}c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"{self.prefix}{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{self.prefix}n{self.count}", **attrs))
        return out


def _inline(g: _Graph, model: onnx.ModelProto, prefix: str, feeds: dict) -> str:
    """Append ``model``'s nodes and weights to ``g`` with every name prefixed, wiring its inputs to ``feeds``
    (input name → value in g); returns the name of its (single) output."""
    sub = compose.add_prefix_graph(model.graph, prefix)
    for inp in model.graph.input:
        g.op("Identity", feeds[inp.name], out=prefix + inp.name)
    g.nodes.extend(sub.node)
    g.inits.extend(sub.initializer)
    return sub.output[0].name


def _x0(g: _Graph, tab: dict, x: str, e: str, t: str, prediction: str) -> str:
    """x̂_0 from the model output e at x and t by P3, as ``reference.posterior.denoised``."""
    def affine(a, b):  # a[t]·x − b[t]·e
        return g.op("Sub", g.op("Mul", g.op("Gather", tab[a], t), x), g.op("Mul", g.op("Gather", tab[b], t), e))

    if prediction == "eps":
        return affine("sqrt_recip_alpha_bars", "sqrt_recipm1_alpha_bars")
    if prediction == "v":
        return affine("sqrt_alpha_bars", "sqrt_one_minus_alpha_bars")
    return e


def _rescale(g: _Graph, guided: str, cond: str, phi: str) -> str:
    """R3 as ``reference.samplers.rescale_guidance``: φ·(x_cfg·r) + (1 − φ)·x_cfg with r = std(x_cond)/std(x_cfg)
    per example over the (C, H, W) axes, and r = 1 where std(x_cfg) = 0."""
    axes = g.const([1, 2, 3], np.int64)

    def std(z):
        d = g.op("Sub", z, g.op("ReduceMean", z, axes, keepdims=1))
        return g.op("Sqrt", g.op("ReduceMean", g.op("Mul", d, d), axes, keepdims=1))

    sd_g = std(guided)
    ratio = g.op("Where", g.op("Equal", sd_g, g.const(0.0, g.real)), g.const(1.0, g.real),
                 g.op("Div", std(cond), sd_g))
    keep = g.op("Mul", g.op("Sub", g.const(1.0, g.real), phi), guided)
    return g.op("Add", g.op("Mul", phi, g.op("Mul", guided, ratio)), keep)


def _step(g: _Graph, tab: dict, x: str, x0: str, t: str, t_prev: str, multistep: str,
          x0_last: str, h_last: str) -> tuple[str, str, str]:
    """One step from t to t_prev on x (float64) given x̂_0 (float64), in the form of ``ddim_coefficients``:
    ξ = √(1−ᾱ_prev)/√(1−ᾱ_t),
    ζ = √ᾱ_prev − ξ√ᾱ_t, x_prev = ζ·D + ξ·x, with D = x̂_0 (DDIM, η = 0) or, where ``multistep`` (a bool) holds,
    DPM-Solver++(2M)'s D = (1 + q)·x̂_0 − q·x̂_0,last with q = h/(2 h_last), h = λ_prev − λ_t (λ = ½ log SNR),
    as ``reference.samplers.dpmpp_2m_sample``: its first-order coefficients, √(1−ᾱ_prev)/√(1−ᾱ_t) and
    −√ᾱ_prev·expm1(−h), are DDIM's ξ and ζ. Returns (x_prev, x̂_0, h) for the next step."""
    def at(table, index):
        return g.op("Gather", tab[table], index)

    ab_prev = at("alpha_bars", t_prev)
    room = g.op("Max", g.op("Sub", g.const(1.0, g.real), ab_prev), g.const(0.0, g.real))
    xi = g.op("Div", g.op("Sqrt", room), at("sqrt_one_minus_alpha_bars", t))
    zeta = g.op("Sub", g.op("Sqrt", ab_prev), g.op("Mul", xi, at("sqrt_alpha_bars", t)))
    h = g.op("Sub", at("half_log_snr", t_prev), at("half_log_snr", t))
    q = g.op("Div", g.op("Mul", g.const(0.5, g.real), h), h_last)
    corrected = g.op("Sub", g.op("Mul", g.op("Add", g.const(1.0, g.real), q), x0), g.op("Mul", q, x0_last))
    d = g.op("Where", multistep, corrected, x0)
    return g.op("Add", g.op("Mul", zeta, d), g.op("Mul", xi, x)), x0, h


def build_sampler(unet: onnx.ModelProto, decoder: onnx.ModelProto, schedule: Schedule, prediction: str,
                  null_class: int | None, precision: str = "float64") -> onnx.ModelProto:
    """The single-graph sampler from the exported unet.onnx and vae_decoder.onnx (same opset); ``null_class``
    None for an unconditional U-Net (no y input); ``precision`` of the loop state and the schedule tables,
    "float64" or "float32" (no float64 anywhere: runtimes without float64 kernels, such as onnxruntime-web's
    WebGPU bundle, can run it). See the module docstring for inputs and outputs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    real = np.float64 if precision == "float64" else np.float32
    conditional = null_class is not None
    latent = [d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim][1:]
    main, body = _Graph("main/", real), _Graph("body/", real)
    # the tables (λ_t = half_log_snr is +inf at t = 0, never used there), named as the runtime checks them
    tab = {key: main.const(table, real, name) for key, (name, table) in
           zip(SAMPLER_TABLES, sampler_tables(schedule, precision).items(), strict=True)}
    T = schedule.T

    # the trailing step list t_i = round(T + i·(−T/N)) and its successors [t_1, …, t_{N−1}, 0]
    steps = main.op("Max", main.op("Min", "steps", main.const(T, np.int64)), main.const(1, np.int64))
    # in integers: t_i = n + 1 where 2r > N or (2r = N and n odd), n, r = divmod(T·(N − i), N)
    p = main.op("Mul", main.const(T, np.int64),
                main.op("Sub", steps, main.op("Range", main.const(0, np.int64), steps, main.const(1, np.int64))))
    n = main.op("Div", p, steps)
    two_r = main.op("Mul", main.const(2, np.int64), main.op("Sub", p, main.op("Mul", n, steps)))
    odd = main.op("Equal", main.op("Mod", n, main.const(2, np.int64)), main.const(1, np.int64))
    up = main.op("Or", main.op("Greater", two_r, steps), main.op("And", main.op("Equal", two_r, steps), odd))
    ts = main.op("Add", n, main.op("Cast", up, to=I64), out="main/timesteps")
    prevs = main.op("Concat", main.op("Slice", ts, main.const([1], np.int64), main.const([2**62], np.int64)),
                    main.const([0], np.int64), axis=0)

    # the loop body: (i, cond, x, x̂_0 of the step before, its h) → (cond, x_prev, x̂_0, h)
    t, t_prev = body.op("Gather", ts, "i"), body.op("Gather", prevs, "i")
    zero = body.const(0, np.int64)
    multistep = body.op("And", body.op("Equal", "method", body.const(GRAPH_SAMPLERS.index("dpmpp2m"), np.int64)),
                        body.op("And", body.op("Greater", "i", zero), body.op("Greater", t_prev, zero)))
    x32 = body.op("Cast", "x", to=F32)
    batch = body.op("Shape", x32, start=0, end=1)
    if conditional:
        w = main.op("Cast", "guidance", to=main.REAL)
        double = body.op("Mul", batch, body.const([2], np.int64))
        feeds = {"x_t": body.op("Concat", x32, x32, axis=0), "t": body.op("Expand", t, double),
                 "y": body.op("Concat", "y", body.op("Expand", body.const(null_class, np.int64), batch), axis=0)}
        out = body.op("Cast", _inline(body, unet, "unet/", feeds), to=main.REAL)
        cond = body.op("Slice", out, body.const([0], np.int64), batch, body.const([0], np.int64))
        uncond = body.op("Slice", out, batch, double, body.const([0], np.int64))
        e = body.op("Add", uncond, body.op("Mul", w, body.op("Sub", cond, uncond)))
        phi = main.op("Cast", "guidance_rescale", to=main.REAL)
        x0 = _rescale(body, _x0(body, tab, "x", e, t, prediction), _x0(body, tab, "x", cond, t, prediction), phi)
    else:
        feeds = {"x_t": x32, "t": body.op("Expand", t, batch)}
        e = body.op("Cast", _inline(body, unet, "unet/", feeds), to=main.REAL)
        x0 = _x0(body, tab, "x", e, t, prediction)
    x_prev, x0, h = _step(body, tab, "x", x0, t, t_prev, multistep, "x0_last", "h_last")
    body.op("Identity", "cond", out="cond_out")
    for value, name in ((x_prev, "x_out"), (x0, "x0_out"), (h, "h_out")):
        body.op("Identity", value, out=name)
    def value(name, dtype, shape=None):
        return helper.make_tensor_value_info(name, dtype, shape)

    body_graph = helper.make_graph(
        body.nodes, "sampler_step",
        [value("i", I64, []), value("cond", BOOL, []), value("x", main.REAL), value("x0_last", main.REAL),
         value("h_last", main.REAL, [])],
        [value("cond_out", BOOL, []), value("x_out", main.REAL), value("x0_out", main.REAL),
         value("h_out", main.REAL, [])],
        initializer=body.inits)

    x_T = main.op("Cast", "noise", to=main.REAL)
    loop = helper.make_node("Loop", [steps, "", x_T, x_T, main.const(1.0, real)],
                            ["main/z0", "main/x0_final", "main/h_final"], name="main/loop", body=body_graph)
    main.nodes.append(loop)
    z0 = "main/z0"
    image = _inline(main, decoder, "vae_decoder/", {"z": main.op("Cast", z0, to=F32)})
    main.op("Identity", image, out="images")

    inputs = [helper.make_tensor_value_info("noise", F32, ["batch", *latent])]
    if conditional:
        inputs += [helper.make_tensor_value_info("y", I64, ["batch"]),
                   helper.make_tensor_value_info("guidance", F32, [])]
    inputs += [helper.make_tensor_value_info("steps", I64, []), helper.make_tensor_value_info("method", I64, [])]
    if conditional:  # optional: its initializer is the default φ = 0
        inputs.append(helper.make_tensor_value_info("guidance_rescale", F32, []))
        main.inits.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "guidance_rescale"))
    out_dims = [d.dim_value for d in decoder.graph.output[0].type.tensor_type.shape.dim][1:]
    graph = helper.make_graph(main.nodes, "ldmkit_sampler", inputs,
                              [helper.make_tensor_value_info("images", F32, ["batch", *out_dims])],
                              initializer=main.inits)
    return helper.make_model(graph, opset_imports=list(unet.opset_import), producer_name="ldmkit",
                             ir_version=unet.ir_version)
