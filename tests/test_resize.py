"""Resize and Upsample: a linear map ``y = M x`` whose weights the compiler builds per axis from onnxruntime, with
the Norm rule (``R_in = x * M^T (R / stab(y))``) and R-LRP's Eq. 6-7 (``Card(J)`` and fan-in from ``M``'s sparsity
pattern). References: interpolation matrices written from the ONNX spec's equations in float64, the rules applied
to them in numpy; PyTorch's ``nn.Upsample`` / ``F.interpolate`` through both exporters; old Upsample files."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import zoo_models as zm
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from onnxlrp.passes.ops.resize import axis_matrix

import onnxlrp
from onnxlrp.errors import UnsupportedOpError

EPS = 1e-6


def stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


# ---------------------------------------------------------------- interpolation weights from the spec's equations


def source_coordinate(transform: str, y: int, scale: float, n_in: int, n_out: int) -> float:
    """``x_original`` of output index ``y`` (ONNX Resize; ``length_resized`` is the integer output length)."""
    if transform == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if transform == "asymmetric":
        return y / scale
    if transform == "pytorch_half_pixel":
        return (y + 0.5) / scale - 0.5 if n_out > 1 else 0.0
    if transform == "align_corners":
        return y * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    raise ValueError(transform)


def nearest_index(x: float, rounding: str) -> int:
    if rounding == "floor":
        return math.floor(x)
    if rounding == "ceil":
        return math.ceil(x)
    half = x - math.floor(x) == 0.5
    if rounding == "round_prefer_floor":
        return math.floor(x) if half else round(x)
    return math.ceil(x) if half else round(x)


def keys(d: float, a: float) -> float:
    """The cubic convolution kernel (Keys 1981) with parameter ``a``."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def reference_matrix(n_in: int, scale: float, mode: str, transform: str, rounding: str = "round_prefer_floor",
                     a: float = -0.75) -> np.ndarray:
    """``M`` [floor(n_in * scale), n_in] with edge padding (taps outside the input read its border)."""
    n_out = math.floor(n_in * scale)
    m = np.zeros((n_out, n_in))
    for y in range(n_out):
        x = source_coordinate(transform, y, scale, n_in, n_out)
        if mode == "nearest":
            m[y, min(max(nearest_index(x, rounding), 0), n_in - 1)] = 1
            continue
        base = math.floor(x)
        t = x - base
        taps = {0: 1 - t, 1: t} if mode == "linear" else {k: keys(t - k, a) for k in (-1, 0, 1, 2)}
        for k, w in taps.items():
            m[y, min(max(base + k, 0), n_in - 1)] += w
    return m


MATRIX_CASES = [("nearest", tr, rd) for tr in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel")
                for rd in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")]
MATRIX_CASES += [(mode, tr, "") for mode in ("linear", "cubic")
                 for tr in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel")]


@pytest.mark.parametrize("mode,transform,rounding", MATRIX_CASES)
def test_axis_matrix_matches_the_spec(mode, transform, rounding):
    """The weights the compiler reads from onnxruntime equal the spec's, for up- and downsampling, at ranks 2-4
    (onnxruntime has kernels per rank; cubic runs at ranks 2 and 4 only)."""
    attributes = {"mode": mode, "coordinate_transformation_mode": transform}
    if rounding:
        attributes["nearest_mode"] = rounding
    for n_in, scale in ((5, 2.0), (4, 2.5), (6, 1.5), (6, 0.5), (7, 0.6)):
        expected = reference_matrix(n_in, scale, mode, transform, rounding or "round_prefer_floor")
        for rank, axis in ((4, 3), (4, 2), (2 if mode == "cubic" else 3, 1)):
            got = axis_matrix(tuple(sorted(attributes.items())), rank, axis, n_in, scale, expected.shape[0], None)
            np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=f"{n_in} x {scale}, rank {rank}")


# ---------------------------------------------------------------- relevance against float64 references


def resize_model(shape, attributes, *, scales=None, sizes=None, n_classes=3, seed=0, opset=19):
    """``x`` -> Resize -> Flatten -> Gemm (no bias) -> ``logits``."""
    rng = np.random.default_rng(seed)
    inputs = ["x", "", "scales" if scales is not None else ""] + (["sizes"] if sizes is not None else [])
    inits = [nh.from_array(np.asarray(v, dt), n) for n, v, dt in
             (("scales", scales, np.float32), ("sizes", sizes, np.int64)) if v is not None]
    out_shape = [int(math.floor(d * s)) for d, s in zip(shape, scales, strict=True)] if scales is not None \
        else list(sizes)
    width = int(np.prod(out_shape[1:]))
    inits.append(nh.from_array(rng.normal(0, 1 / np.sqrt(width), (n_classes, width)).astype(np.float32), "W"))
    nodes = [h.make_node("Resize", inputs, ["y"], name="the_resize", **attributes),
             h.make_node("Flatten", ["y"], ["f"]), h.make_node("Gemm", ["f", "W"], ["logits"], transB=1, name="fc")]
    batch = shape[0] if sizes is not None else "N"  # constant sizes fix the batch too
    graph = h.make_graph(nodes, "resize", [h.make_tensor_value_info("x", T.FLOAT, [batch, *shape[1:]])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", n_classes])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=9)


def apply_axes(t: np.ndarray, matrices: dict[int, np.ndarray]) -> np.ndarray:
    """``t`` with ``matrices[a]`` [new, old] applied along each axis ``a``."""
    for a, m in matrices.items():
        t = np.moveaxis(np.tensordot(m, np.moveaxis(t, a, 0), axes=1), 0, a)
    return t


def rlrp_axis(m: np.ndarray) -> np.ndarray:
    """Eq. 6-7 per axis: ``Card(J_i) * M_ji / M_j`` (as [inputs, outputs])."""
    nonzero = m != 0
    return nonzero.sum(0)[:, None] * m.T / nonzero.sum(1)[None, :]


def reference_relevance(model, x, matrices, rule, target, stabilizer=EPS):
    w = nh.to_array(next(t for t in model.graph.initializer if t.name == "W")).astype(np.float64)
    y = apply_axes(x, matrices)
    f = y.reshape(len(x), -1)
    logits = f @ w.T
    n = np.arange(len(x))
    r = np.zeros_like(logits)
    r[n, target] = logits[n, target]
    if rule == "epsilon":
        r_y = (f * ((r / stab(logits)) @ w)).reshape(y.shape)
        return x * apply_axes(r_y / stab(y, stabilizer), {a: m.T for a, m in matrices.items()})
    z_y = (f * (r @ w) / f.shape[1]).reshape(y.shape)
    z = x * apply_axes(z_y, {a: rlrp_axis(m) for a, m in matrices.items()})
    return z * (np.abs(logits[n, target]) / np.abs(z.reshape(len(x), -1)).sum(1)).reshape(-1, *[1] * (x.ndim - 1))


RELEVANCE_CASES = {
    # name: (input shape, attributes, scales, {axis: (mode, transform, rounding)})
    "nearest2x_nchw": ((2, 2, 3, 4), {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                      "nearest_mode": "floor"}, [1, 1, 2, 2]),
    "bilinear_nchw": ((2, 2, 4, 5), {"mode": "linear"}, [1, 1, 1.5, 2.5]),
    "bicubic_align_corners": ((2, 1, 4, 5), {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
                              [1, 1, 2, 1.6]),
    "linear_1d_downsample": ((2, 3, 9), {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                             [1, 1, 0.5]),
    "trilinear_5d": ((2, 1, 3, 3, 4), {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
                     [1, 1, 2, 1.5, 0.75]),
    "nearest_channels": ((2, 3, 2, 2), {"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, [1, 2, 1, 1]),
    "nearest_nhwc": ((2, 3, 4, 2), {"mode": "nearest"}, [1, 1.5, 2, 1]),
}


def case_matrices(shape, attributes, scales):
    transform = attributes.get("coordinate_transformation_mode", "half_pixel")
    rounding = attributes.get("nearest_mode", "round_prefer_floor")
    return {a: reference_matrix(shape[a], s, attributes["mode"], transform, rounding)
            for a, s in enumerate(scales) if s != 1}


@pytest.mark.parametrize("case", list(RELEVANCE_CASES))
@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
def test_relevance_against_float64_reference(case, rule):
    shape, attributes, scales = RELEVANCE_CASES[case]
    model = resize_model(shape, attributes, scales=scales)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    compiled = onnxlrp.compile(model, rule)
    out = zm.run_compiled(compiled, {"x": x})
    np.testing.assert_array_equal(out["logits"], zm.run_source(model, {"x": x}, ["logits"])[0])
    expected = reference_relevance(model, x.astype(np.float64), case_matrices(shape, attributes, scales), rule,
                                   out["explained_class"])
    assert np.isfinite(out["relevance"]).all()
    np.testing.assert_allclose(out["relevance"], expected, rtol=0, atol=3e-5 * np.abs(expected).max())
    if case == "nearest2x_nchw":  # M^T sums blocks: a Reshape and a ReduceSum per axis, no MatMul
        ops = [n.op_type for n in compiled.graph.node if n.name.startswith("lrp/the_resize/")]
        assert "MatMul" not in ops and ops.count("ReduceSum") == 2, ops


def test_composite_selects_norm_with_its_stabilizer(tmp_path):
    shape, attributes, scales = RELEVANCE_CASES["bilinear_nchw"]
    model = resize_model(shape, attributes, scales=scales)
    toml = tmp_path / "resize.toml"
    toml.write_text('[[layer]]\nop = "Resize"\nrule = "norm"\nstabilizer = 0.5\n[[layer]]\nrule = "epsilon"\n')
    assert onnxlrp.inspect(model, composite=toml).rules["the_resize"] == "norm(stabilizer=0.5)"
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    out = zm.run_compiled(onnxlrp.compile(model, composite=toml), {"x": x})
    expected = reference_relevance(model, x.astype(np.float64), case_matrices(shape, attributes, scales), "epsilon",
                                   out["explained_class"], stabilizer=0.5)
    np.testing.assert_allclose(out["relevance"], expected, rtol=0, atol=3e-5 * np.abs(expected).max())


EVERY_MODE = [{"mode": "nearest", "coordinate_transformation_mode": tr, "nearest_mode": rd}
              for tr in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric",
                         "tf_crop_and_resize") for rd in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")]
EVERY_MODE += [{"mode": mode, "coordinate_transformation_mode": tr} for mode in ("linear", "cubic")
               for tr in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric",
                          "tf_crop_and_resize")]
EVERY_MODE += [{"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, {"mode": "linear", "antialias": 1},
               {"mode": "cubic", "antialias": 1}]


def test_every_mode_conserves_relevance():
    """Every mode and coordinate transformation, up- and downsampling, given by scales or sizes: with the Norm rule
    and a bias-free network, ``sum R_x = logit`` holds exactly when the compiler's ``M`` is the map onnxruntime's
    forward pass computes (any difference shows up as a loss of relevance)."""
    x = np.random.default_rng(3).random((2, 2, 4, 5), dtype=np.float32) + 0.1
    failures = []
    for attributes in EVERY_MODE:
        for scales, sizes in (([1, 1, 2.5, 1.6], None), ([1, 1, 0.5, 0.7], None), (None, [2, 2, 7, 3])):
            model = resize_model(x.shape, attributes, scales=scales, sizes=sizes, n_classes=2)
            if attributes.get("coordinate_transformation_mode") == "tf_crop_and_resize":  # crop box [0.1, 0.9] per axis
                model.graph.initializer.append(nh.from_array(np.array([0, 0, 0.1, 0.1, 1, 1, 0.9, 0.9], np.float32),
                                                             "roi"))
                model.graph.node[0].input[1] = "roi"
            out = zm.run_compiled(onnxlrp.compile(model, "epsilon", epsilon=1e-9, stabilizer=1e-9), {"x": x})
            explained = out["logits"][np.arange(2), out["explained_class"]]
            error = np.abs(out["relevance"].reshape(2, -1).sum(1) - explained).max() / np.abs(explained).max()
            if not error < 1e-4:
                failures.append(f"{attributes} scales={scales} sizes={sizes}: {error:.2e}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- old files: Upsample and Resize-10


def legacy_upsample_model(op: str, opset: int, mode: str) -> onnx.ModelProto:
    """``x [2, 2, 3, 3]`` -> Upsample/Resize-10 by (1, 1, 1.5, 2.5) -> Flatten -> MatMul, as pre-opset-11 files."""
    scales = [1, 1, 1.5, 2.5]
    if opset == 7:
        resize = h.make_node(op, ["x"], ["y"], mode=mode, scales=scales)
        inits = []
    else:
        resize = h.make_node(op, ["x", "s"], ["y"], mode=mode)
        inits = [nh.from_array(np.array(scales, np.float32), "s")]
    w = np.random.default_rng(0).normal(0, 0.2, (2 * 4 * 7, 3)).astype(np.float32)
    nodes = [resize, h.make_node("Flatten", ["y"], ["f"]), h.make_node("MatMul", ["f", "W"], ["logits"])]
    graph = h.make_graph(nodes, "old", [h.make_tensor_value_info("x", T.FLOAT, [2, 2, 3, 3])],
                         [h.make_tensor_value_info("logits", T.FLOAT, [2, 3])],
                         initializer=[*inits, nh.from_array(w, "W")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=5)


@pytest.mark.parametrize("op,opset,mode", [("Upsample", 7, "nearest"), ("Upsample", 9, "nearest"),
                                           ("Upsample", 9, "linear"), ("Resize", 10, "linear"),
                                           ("Resize", 10, "nearest")])
def test_legacy_upsample_keeps_its_values(op, opset, mode):
    """Before opset 11 Upsample/Resize read the input at ``x / scale`` (asymmetric). The version converter writes a
    Resize-13 with the default half_pixel coordinates, which moved these logits by up to 0.22 (linear); the
    canonicalization restores the old coordinates, so the original outputs are unchanged."""
    model = legacy_upsample_model(op, opset, mode)
    x = np.random.default_rng(1).random((2, 2, 3, 3), dtype=np.float32)
    reference = zm.run_source(model, {"x": x}, ["logits"])[0]
    for rule in ("epsilon", "rlrp"):
        params = {"epsilon": 1e-9, "stabilizer": 1e-9} if rule == "epsilon" else {}
        out = zm.run_compiled(onnxlrp.compile(model, rule, **params), {"x": x})
        np.testing.assert_allclose(out["logits"], reference, rtol=1e-6, atol=1e-7)
        assert np.isfinite(out["relevance"]).all()
        if rule == "epsilon":
            np.testing.assert_allclose(out["relevance"].reshape(2, -1).sum(1),
                                       reference[np.arange(2), out["explained_class"]], rtol=1e-4)


# ---------------------------------------------------------------- refusals


def test_data_dependent_scales_are_refused_in_one_line():
    model = resize_model((2, 2, 3, 3), {"mode": "nearest"}, scales=[1, 1, 2, 2])
    model.graph.node.insert(0, h.make_node("Abs", ["scales_in"], ["scales"], name="scales_from_input"))
    model.graph.input.append(h.make_tensor_value_info("scales_in", T.FLOAT, [4]))
    del model.graph.initializer[0]
    with pytest.raises(UnsupportedOpError, match=r"Resize x1 \(the_resize: .*constant scales or sizes") as info:
        onnxlrp.compile(model, "epsilon", input_shapes={"x": [2, 2, 3, 3]})
    assert "\n" not in str(info.value)


def test_keep_aspect_ratio_with_sizes_is_refused():
    model = resize_model((2, 2, 3, 4), {"mode": "nearest", "keep_aspect_ratio_policy": "not_larger"},
                         sizes=[2, 2, 6, 6])
    model.graph.node[0].input[2] = ""
    with pytest.raises((UnsupportedOpError, onnxlrp.OnnxlrpError), match="keep_aspect_ratio_policy|not valid"):
        onnxlrp.compile(model, "epsilon")


# ---------------------------------------------------------------- PyTorch: nn.Upsample and F.interpolate


def torch_upsampling_net():
    torch = pytest.importorskip("torch")
    nn, functional = torch.nn, torch.nn.functional

    class UpNet(nn.Module):
        """A small decoder: nearest x2 (nn.Upsample), bilinear to a fixed size, bicubic with align_corners, a
        skip Concat, no biases (so that epsilon conserves relevance)."""

        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.mix = nn.Conv2d(7, 4, 3, padding=1, bias=False)
            self.head = nn.Linear(4, 5, bias=False)

        def forward(self, x):
            e = torch.relu(self.enc(x))
            u = torch.cat([self.up(e), x], 1)
            m = torch.relu(self.mix(u))
            m = functional.interpolate(m, size=(5, 7), mode="bilinear", align_corners=False)
            m = functional.interpolate(m, scale_factor=1.5, mode="bicubic", align_corners=True)
            return self.head(m.mean((2, 3)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UpNet().eval()


@pytest.mark.parametrize("export", ["ts17", "ts17+dynamic", pytest.param("dynamo18", marks=pytest.mark.slow),
                                    pytest.param("dynamo18+dynamic", marks=pytest.mark.slow)])
def test_torch_upsampling_both_exporters(export):
    """Compiles for epsilon, rlrp and epsilon-plus-flat; the original outputs are unchanged, the relevance is finite
    and, for epsilon on this bias-free net, conserves the logit (the bilinear ``size=`` gives sizes computed from
    ``Shape(x)``, which the compiler evaluates for any batch)."""
    torch = pytest.importorskip("torch")
    import torch_models as tm

    name, dynamic = export.removesuffix("+dynamic"), export.endswith("+dynamic")
    exporter, opset = tm.EXPORTS[name]
    x = np.random.default_rng(4).random((2, 3, 8, 8), dtype=np.float32)
    proto = tm.export(torch_upsampling_net(), torch.from_numpy(x), exporter=exporter, opset=opset,
                      dynamic_batch=dynamic)
    assert tm.op_types(proto).count("Resize") == 3
    reference = tm.run_source(proto, x)
    with torch.no_grad():
        np.testing.assert_allclose(reference, torch_upsampling_net()(torch.from_numpy(x)).numpy(), atol=1e-5)
    for rule in ("epsilon", "rlrp", "epsilon-plus-flat"):
        out = tm.run_compiled(onnxlrp.compile(proto, rule, **({"epsilon": 1e-9} if rule == "epsilon" else {})), x)
        np.testing.assert_allclose(out[tm.OUTPUT_NAME], reference, rtol=1e-6, atol=1e-7)
        relevance = out["relevance"]
        assert relevance.shape == x.shape and np.isfinite(relevance).all()
        assert (np.abs(relevance).reshape(2, -1).max(1) > 0).all()
        if rule == "epsilon":
            explained = reference[np.arange(2), out["explained_class"]]
            np.testing.assert_allclose(relevance.reshape(2, -1).sum(1), explained, rtol=1e-3)


def test_onnx_checker_accepts_the_compiled_model():
    shape, attributes, scales = RELEVANCE_CASES["trilinear_5d"]
    onnx.checker.check_model(onnxlrp.compile(resize_model(shape, attributes, scales=scales), "rlrp"), full_check=True)
