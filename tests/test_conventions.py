"""Models as other people's converters write them: several outputs (boxes and class scores), Sigmoid heads, the
batch on another axis than the first, many unsupported nodes; what compile and inspect choose and say."""

from __future__ import annotations

import subprocess
import sys

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from helpers import assert_close_relative, session
from netspec import Flatten, Relu
from onnx import TensorProto, helper, numpy_helper
from onnxlrp.passes.diagnostics import MAX_SUMMARY_CHARS
from PIL import Image
from spec_zoo import ZOO

import onnxlrp
from onnxlrp import apps
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def mlp(seed: int, head: str | None):
    """The "mlp" net (5 -> 8 -> 6 -> 3, BatchNorm) with output ``y``: the logits (``head=None``), or
    ``head(logits)`` for a Softmax or Sigmoid head (the logits are then the tensor ``logits``)."""
    rng = np.random.default_rng(seed)
    layers, shape = ZOO["mlp"](rng)
    model = ns.to_onnx(layers, shape, softmax=head is not None)
    if head == "Sigmoid":
        (node,) = [n for n in model.graph.node if n.op_type == "Softmax"]
        node.op_type = "Sigmoid"
        del node.attribute[:]
    return layers, rng.normal(size=shape), model


def with_box_head(model: onnx.ModelProto, width: int = 4, rank3: bool = False) -> onnx.ModelProto:
    """``model`` with a box regression ``boxes = x W_b`` ([batch, width]) as its FIRST output (and, with ``rank3``,
    a [batch, 4, 4] output second), as detection exports have them."""
    rng = np.random.default_rng(7)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(rng.normal(size=(5, width)).astype(np.float32), "w_boxes"))
    graph.node.append(helper.make_node("MatMul", ["x", "w_boxes"], ["boxes"], name="box_head"))
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", width])]
    if rank3:
        graph.initializer.append(numpy_helper.from_array(np.array([-1, 4, 4], np.int64), "grid"))
        graph.initializer.append(numpy_helper.from_array(rng.normal(size=(5, 16)).astype(np.float32), "w_grid"))
        graph.node.append(helper.make_node("MatMul", ["x", "w_grid"], ["grid_flat"], name="grid_head"))
        graph.node.append(helper.make_node("Reshape", ["grid_flat", "grid"], ["anchors"], name="grid_reshape"))
        outputs.append(helper.make_tensor_value_info("anchors", TensorProto.FLOAT, ["batch", 4, 4]))
    outputs += list(graph.output)
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------- the explained output

def test_two_outputs_explain_the_class_scores_and_say_why():
    """boxes first, Softmax class scores second: the scores' logits are explained (not the box regression)."""
    layers, x, model = mlp(60, "Softmax")
    model = with_box_head(model)
    compiled = onnxlrp.compile(model, "epsilon")
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.explained"] == "logits"
    assert meta["onnxlrp.explained_why"] == ("the input (logits) of the Softmax that makes output 'y' (class scores; "
                                             "not 'boxes', --output chooses another)")
    relevance, cls = session(compiled).run(["relevance", "explained_class"], {"x": x.astype(np.float32)})
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon"), 1e-5)
    np.testing.assert_array_equal(cls, ref.forward(layers, x).argmax(1))
    boxes = onnxlrp.compile(model, "epsilon", output="boxes")  # --output still overrides
    assert {p.key: p.value for p in boxes.metadata_props}["onnxlrp.explained_why"] == "output 'boxes' (--output)"


def test_without_a_score_head_the_largest_batch_by_k_output_is_explained():
    """boxes [batch, 2], anchors [batch, 4, 4] and the logits y [batch, 3], no Softmax: y is the largest [batch, K]
    output (the larger rank-3 output is no score vector); with 4-wide boxes, the boxes would be."""
    layers, x, model = mlp(61, None)
    compiled = onnxlrp.compile(with_box_head(model, width=2, rank3=True), "epsilon")
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.explained"] == "y"
    assert meta["onnxlrp.explained_why"] == (
        "output 'y' (class scores: the largest [batch, K] float output, K = 3; no output comes from a Softmax or "
        "Sigmoid; not 'boxes', 'anchors', --output chooses another)")
    relevance = session(compiled).run(["relevance"], {"x": x.astype(np.float32)})[0]
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon"), 1e-5)
    wide = onnxlrp.compile(with_box_head(mlp(61, None)[2], width=4), "epsilon")
    assert {p.key: p.value for p in wide.metadata_props}["onnxlrp.explained"] == "boxes"


@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
def test_sigmoid_head_is_explained_at_its_logit(rule):
    """A Sigmoid head, like a Softmax head, is explained at its input: the seed is the logit of the class, not its
    probability (the two maps differ by sigmoid(z)/z per sample)."""
    layers, x, model = mlp(62, "Sigmoid")
    compiled = onnxlrp.compile(model, rule)
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.explained"] == "logits"
    assert "of the Sigmoid that makes output 'y'" in meta["onnxlrp.explained_why"]
    probabilities, relevance, cls = session(compiled).run(["y", "relevance", "explained_class"],
                                                          {"x": x.astype(np.float32)})
    logits = ref.forward(layers, x)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_array_equal(cls, logits.argmax(1))
    expected = ref.lrp(layers, x, "epsilon") if rule == "epsilon" else ref.rlrp(layers, x)
    assert_close_relative(relevance, expected, 1e-5 if rule == "epsilon" else 1e-4)
    z = logits[np.arange(len(x)), cls]
    at_probability = expected * (1 / (1 + np.exp(-z)) / z).reshape(-1, 1)
    assert np.abs(relevance - at_probability).max() > 0.1 * np.abs(expected).max()


def test_compile_and_inspect_print_the_explained_output(tmp_path):
    _, _, model = mlp(63, "Softmax")
    path = tmp_path / "det.onnx"
    onnx.save(with_box_head(model), path)
    line = ("explained tensor: logits, the input (logits) of the Softmax that makes output 'y' (class scores; "
            "not 'boxes', --output chooses another)")
    done = run_cli("compile", path, "-o", tmp_path / "out.onnx")
    assert done.returncode == 0 and line in done.stdout.splitlines()
    done = run_cli("inspect", path, "--output", "boxes")
    assert done.returncode == 0 and "explained tensor: boxes, output 'boxes' (--output)" in done.stdout.splitlines()


# ---------------------------------------------------------------------------------------------- --input-shape hints

def state_model(dims: list, sliced: bool) -> onnx.ModelProto:
    """``state`` (dims as given: [2, 'batch', 'len'] ...) -> Transpose to [batch, 2, len] -> Conv1d -> Relu ->
    Flatten -> MatMul; with ``sliced``, a Slice along the state's axis 1 first (a node that needs that axis static)."""
    rng = np.random.default_rng(64)
    inits = [numpy_helper.from_array(rng.normal(size=(2, 2, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(2 * 14, 5)).astype(np.float32), "wd")]
    nodes, state = [], "state"
    if sliced:
        inits += [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in
                  dict(starts=0, ends=-1, axes=1, steps=2).items()]
        nodes.append(helper.make_node("Slice", ["state", "starts", "ends", "axes", "steps"], ["s"], name="every_other"))
        state = "s"
    nodes += [helper.make_node("Transpose", [state], ["t"], perm=[1, 0, 2], name="to_batch_first"),
              helper.make_node("Conv", ["t", "w"], ["c"], name="conv"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
              helper.make_node("MatMul", ["f", "wd"], ["y"], name="dense")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("state", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_input_shape_hint_keeps_the_batch_where_it_is(tmp_path):
    """[2, 'batch', 'len']: the batch is axis 1 (by its name); the hint keeps it there, open, and asks for the
    length; compiled with that hint, the model runs on any batch and explains each sample."""
    path = tmp_path / "state.onnx"
    onnx.save(state_model([2, "batch", "len"], sliced=False), path)
    done = run_cli("compile", path, "-o", tmp_path / "out.onnx")
    assert done.returncode == 1 and not (tmp_path / "out.onnx").exists()
    assert done.stderr == (f"error: {path}: input 'state' has open dims [2, 'batch', 'len'] and node 'conv' (Conv) "
                           "needs static sizes: give them with --input-shape state=2,-1,N (N = your size; -1 keeps "
                           "axis 1, the batch (by its name 'batch'), dynamic)\n")
    # epsilon: R-LRP's final scaling takes the input's axis 0 as the batch
    assert run_cli("compile", path, "-o", tmp_path / "out.onnx", "--rule", "epsilon",
                   "--input-shape", "state=2,-1,16").returncode == 0
    compiled = onnx.load(tmp_path / "out.onnx")
    x = np.random.default_rng(65).normal(size=(2, 3, 16)).astype(np.float32)
    relevance, cls = session(compiled).run(["relevance", "explained_class"], {"state": x})
    assert relevance.shape == (2, 3, 16) and cls.shape == (3,)
    one = session(compiled).run(["relevance"], {"state": x[:, 1:2]})[0]  # a sample's map does not depend on the
    np.testing.assert_allclose(one[:, 0], relevance[:, 1], rtol=1e-5, atol=1e-7)  # others: the batch is axis 1


def test_input_shape_hint_when_only_the_batch_is_open():
    """[2, 'batch', 128] with a node that slices the batch axis: only a batch size can help, and the hint says so
    with the dims in their order (not `state=-1,N,128`)."""
    with pytest.raises(OnnxlrpError) as err:
        onnxlrp.compile(state_model([2, "batch", 16], sliced=True), "epsilon")
    assert str(err.value) == (
        "model: input 'state' has open dims [2, 'batch', 16] and node 'every_other' (Slice) needs static sizes; its "
        "only open axis is the batch (axis 1, by its name 'batch'): give a batch size with --input-shape "
        "state=2,B,16 (B = your batch size; -1 there would keep it open)")
    compiled = onnxlrp.compile(state_model([2, "batch", 16], sliced=True), "epsilon",
                               input_shapes={"state": [2, 4, 16]})
    assert session(compiled).run(["relevance"], {"state": np.ones((2, 4, 16), np.float32)})[0].shape == (2, 4, 16)


def test_batch_axis_by_name_and_position():
    from onnxlrp.passes.diagnostics import batch_axis

    assert batch_axis(["N", 3, "h", "w"])[0] == 0
    assert batch_axis(["seq", "batch_size", 64])[0] == 1
    assert batch_axis(["unk__12", 12, 12, 3]) == (0, "the first axis, open, as exporters write the batch")
    assert batch_axis([2, "time", 128])[0] is None


# ---------------------------------------------------------------------------------------------- error lines

def many_unsupported(n_quotients: int = 30, n_custom: int = 5) -> onnx.ModelProto:
    """x -> Relu -> n_custom custom ops -> n_quotients Divs of two activations (a chain, each by the last custom
    op's output) -> MatMul: n_custom + n_quotients node(s) without a rule, with long names."""
    nodes = [helper.make_node("Relu", ["x"], ["a0"], name="relu")]
    h = "a0"
    for i in range(n_custom):
        nodes.append(helper.make_node("Weird", [h], [f"w{i}"], name=f"custom_{i}", domain="my.domain"))
        h = f"w{i}"
    divisor, h = h, "a0"
    for i in range(n_quotients):
        nodes.append(helper.make_node("Div", [h, divisor], [f"q{i}"], name=f"block_{i}/squeeze_excite/gate_div_{i}"))
        h = f"q{i}"
    nodes.append(helper.make_node("MatMul", [h, "W"], ["y"], name="dense"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(np.ones((4, 2), np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])


def test_unsupported_error_line_is_capped_grouped_and_names_the_file(tmp_path):
    path = tmp_path / "gated.onnx"
    onnx.save(many_unsupported(), path)
    done = run_cli("compile", path)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    prefix = f"error: {path}: 35 node(s) on the relevance path have no rule: "
    assert line.startswith(prefix)
    assert len(line) - len(prefix) <= MAX_SUMMARY_CHARS + len("; onnxlrp inspect lists every node")
    assert line.endswith("; onnxlrp inspect lists every node")
    assert ("Div x30 (block_0/squeeze_excite/gate_div_0, block_1/squeeze_excite/gate_div_1, "
            "block_2/squeeze_excite/gate_div_2, ...: a quotient of two relevance-carrying tensors has no LRP rule)"
            in line)
    assert "my.domain.Weird x5 (custom_0, custom_1, custom_2, ...: no relevance rule for this op)" in line
    done = run_cli("inspect", path)  # inspect keeps the full list, one line per node
    assert done.returncode == 2
    listed = [ln for ln in done.stdout.splitlines() if ln.startswith("  ") and "domain" in ln]
    assert len(listed) == 35 and "  block_29/squeeze_excite/gate_div_29 (Div, domain ai.onnx, opset 17): a quotient" \
        in done.stdout


def test_unsupported_error_counts_what_does_not_fit():
    """100 op types: the line lists what fits in the cap and counts the rest."""
    nodes = [helper.make_node("Relu", ["x"], ["h0"], name="relu")]
    for i in range(100):
        nodes.append(helper.make_node(f"Op{i}", [f"h{i}"], [f"h{i + 1}"], name=f"n{i}", domain="custom"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("h100", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    with pytest.raises(UnsupportedOpError) as err:
        onnxlrp.compile(model, "epsilon")
    message = str(err.value)
    assert message.startswith("model: 100 node(s) on the relevance path have no rule: custom.Op0 x1 (n0: no ")
    shown = message.count(" x1 (")
    assert 3 <= shown < 100 and f"; and {100 - shown} more op type(s), {100 - shown} node(s)" in message
    assert len(message) < 600


# ---------------------------------------------------------------------------------------------- images: layout, BGR

def image_cnn(channels: int, side: int, seed: int):
    """An NCHW CNN (netspec) on ``[N, channels, side, side]`` images: Conv, Relu, strided Conv, Relu, Dense."""
    rng = np.random.default_rng(seed)
    layers = [ns.conv(rng, channels, 4, 3, pad=1), Relu(), ns.conv(rng, 4, 4, 3, stride=2, pad=1), Relu(), Flatten(),
              ns.dense(rng, 4 * (side // 2) ** 2, 5)]
    return layers, ns.to_onnx(layers, (1, channels, side, side))


def as_nhwc(model: onnx.ModelProto, name: str = "image") -> onnx.ModelProto:
    """``model`` behind ``Transpose(perm=[0, 3, 1, 2])`` of an NHWC input, as tf2onnx and keras2onnx write it."""
    nhwc = onnx.ModelProto()
    nhwc.CopyFrom(model)
    (vi,) = nhwc.graph.input
    batch, c, h, w = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    nhwc.graph.node.insert(0, helper.make_node("Transpose", [name], [vi.name], name="to_nchw", perm=[0, 3, 1, 2]))
    del nhwc.graph.input[:]
    nhwc.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, h, w, c]))
    onnx.checker.check_model(nhwc)
    return nhwc


def image_file(path, channels: int, side: int, seed: int):
    """A random PNG of ``side x side`` pixels; returns it as float64 ``[C, H, W]`` in [0, 1]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, channels), dtype=np.uint8)
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(path)
    return pixels.transpose(2, 0, 1) / 255.0


@pytest.mark.parametrize("channels,side", [(3, 6), (1, 48)])
def test_explain_nhwc_model_feeds_nhwc_and_writes_its_layout(tmp_path, capsys, channels, side):
    """A Keras-style NHWC model (input [N, side, side, C], a Transpose before the first Conv; [N, 48, 48, 1] was
    refused as "48 channels") gives the NCHW model's relevance, in [H, W, C], and the same heatmap."""
    layers, nchw = image_cnn(channels, side, seed=66 + channels)
    onnx.save(nchw, tmp_path / "nchw.onnx")
    onnx.save(as_nhwc(nchw), tmp_path / "nhwc.onnx")
    x = image_file(tmp_path / "img.png", channels, side, seed=67)
    maps = {}
    for name in ("nchw", "nhwc"):
        out = tmp_path / f"out_{name}"
        assert main(["explain", str(tmp_path / f"{name}.onnx"), str(tmp_path / "img.png"), "--rule", "epsilon",
                     "-o", str(out)]) == 0
        maps[name] = np.load(out / "img.npy"), np.asarray(Image.open(out / "img.png"))
        printed = capsys.readouterr().out
        if name == "nhwc":
            assert ("input 'image': NHWC (its first Conv 'n_Conv_4' reads axis 3 as channels, through a Transpose); "
                    "images are fed as NHWC, each .npy holds the relevance as [H, W, C]") in printed.splitlines()
        else:
            assert "input 'x': NCHW (its first Conv 'n_Conv_4' reads axis 1 as channels, directly)" in printed
    expected = ref.lrp(layers, x[None], "epsilon")[0]
    assert maps["nchw"][0].shape == (channels, side, side) and maps["nhwc"][0].shape == (side, side, channels)
    assert_close_relative(maps["nchw"][0], expected, 1e-5)
    assert_close_relative(maps["nhwc"][0].transpose(2, 0, 1), expected, 1e-5)
    assert np.abs(maps["nhwc"][1].astype(int) - maps["nchw"][1]).max() <= 1  # the same heatmap


def test_layout_from_the_first_conv_when_the_shape_is_ambiguous():
    """[N, 3, 8, 1]: 1 or 3 channels on both axes 1 and 3; the first Conv decides (through the Transpose: NHWC
    with 1 channel; read directly: NCHW with 3), and without a Conv the shape says NCHW, ONNX's convention."""
    from onnxlrp.apps.layout import image_layout

    _, gray = image_cnn(1, 8, seed=70)
    nhwc = as_nhwc(gray)
    nhwc.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3  # [N, 3, 8, 1]: an NHWC image 3 pixels high
    layout = image_layout(nhwc.graph, "image", (3, 8, 1), "m.onnx")
    assert (layout.name, layout.channels, layout.height, layout.width) == ("NHWC", 1, 3, 8)
    _, rgb = image_cnn(3, 8, seed=71)
    layout = image_layout(rgb.graph, "x", (3, 8, 1), "m.onnx")
    assert (layout.name, layout.channels, layout.height, layout.width) == ("NCHW", 3, 8, 1)
    dense_only = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"])], "g", [], [])
    layout = image_layout(dense_only, "x", (3, 8, 1), "m.onnx")
    assert layout.name == "NCHW" and "NCHW is ONNX's convention" in layout.why
    with pytest.raises(OnnxlrpError, match=r"^m.onnx: input 'x' has shape \[N, 48, 48, 5\]: neither axis 1"):
        image_layout(dense_only, "x", (48, 48, 5), "m.onnx")


def test_caffe_and_bgr_preprocessing_numbers(tmp_path):
    """caffe: RGB in [0, 1] -> BGR, times 255, minus the ImageNet mean in B, G, R order, no std (Keras' "caffe"
    mode); a TOML file's channels = "bgr" reverses the channels before its scale, mean and std (given in B, G, R)."""
    rgb = np.array([[1.0, 0.2], [0.5, 0.4], [0.0, 0.6]], np.float32).reshape(1, 3, 1, 2)  # pixels (R, G, B)
    caffe = apps.make_preprocess("caffe", 3)(rgb).reshape(3, 2)
    np.testing.assert_allclose(caffe, [[0.0 - 103.939, 0.6 * 255 - 103.939], [0.5 * 255 - 116.779,
                                       0.4 * 255 - 116.779], [255 - 123.68, 0.2 * 255 - 123.68]], rtol=1e-6)
    toml = tmp_path / "bgr.toml"
    toml.write_text('channels = "bgr"\nscale = 2.0\nmean = [0.1, 0.2, 0.3]\nstd = [0.5, 0.5, 0.25]\n')
    bgr = apps.make_preprocess(str(toml), 3)(rgb).reshape(3, 2)
    np.testing.assert_allclose(bgr, [[(0.0 - 0.1) / 0.5, (1.2 - 0.1) / 0.5], [(1.0 - 0.2) / 0.5, (0.8 - 0.2) / 0.5],
                                     [(2.0 - 0.3) / 0.25, (0.4 - 0.3) / 0.25]], rtol=1e-6)
    toml.write_text('channels = "grb"\n')
    with pytest.raises(OnnxlrpError, match="channels must be \"rgb\" or \"bgr\", not 'grb'"):
        apps.make_preprocess(str(toml), 3)
    with pytest.raises(OnnxlrpError, match="--preprocess caffe needs a 3-channel"):
        apps.make_preprocess("caffe", 1)


def test_explain_tf2onnx_keras_model_with_caffe_preprocessing(tmp_path, capsys):
    """A Keras CNN through tf2onnx (NHWC [N, 12, 12, 3]) explained with --preprocess caffe: the .npy equals the
    compiled model's relevance for the BGR, mean-subtracted NHWC input computed here by hand."""
    from test_sklearn_keras import tf2onnx_cnn_bytes

    (tmp_path / "keras.onnx").write_bytes(tf2onnx_cnn_bytes(True))
    x = image_file(tmp_path / "img.png", 3, 12, seed=72)
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "keras.onnx"), str(tmp_path / "img.png"), "--preprocess", "caffe",
                 "--rule", "epsilon", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input 'image': NHWC (its first Conv" in printed and "through a Transpose" in printed
    bgr = (x[::-1] * 255 - np.array([103.939, 116.779, 123.68]).reshape(3, 1, 1)).transpose(1, 2, 0)[None]
    result = onnxlrp.Explainer(str(tmp_path / "keras.onnx"), rule="epsilon")(bgr.astype(np.float32))
    assert_close_relative(np.load(out / "img.npy"), result.relevance[0], 1e-5)
    assert f"class {int(result.explained_class[0])} " in printed


def test_explain_asks_for_open_image_dims_in_the_inputs_order(tmp_path, capsys):
    _, model = image_cnn(3, 6, seed=73)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()
        dim.dim_param = "side"
    onnx.save(model, tmp_path / "open.onnx")
    image_file(tmp_path / "img.png", 3, 6, seed=74)
    args = ["explain", str(tmp_path / "open.onnx"), str(tmp_path / "img.png"), "-o", str(tmp_path / "out")]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'open.onnx'}: input 'x' has shape [?, 3, ?, ?]; every axis but the batch (axis 0) must "
        "be fixed: give them with --input-shape x=-1,3,N,N (N = your size; -1 keeps the batch dynamic)\n")
    assert not (tmp_path / "out").exists()
    assert main([*args, "--input-shape", "x=-1,3,6,6"]) == 0
    assert np.load(tmp_path / "out" / "img.npy").shape == (3, 6, 6)
