"""A wake-word-style audio classifier explained down to its waveform, and at its spectrogram (``node_input=``).

The torch model: a reflect Pad, a Conv-based STFT (two strided Conv1d with the windowed cosine and sine kernels),
the magnitude ``sqrt(re^2 + im^2)``, a mel projection (a 1x1 Conv1d with non-negative weights), ``log(mel + 1e-3)``,
then two Conv1d-ReLU layers, a max pool, a mean over time and a dense head; exported by both torch exporters.

The reference is tests/graph_reference.py, extended by the three pieces of the front-end (:class:`AudioReference`,
written from README.md): a Pad's copies send their relevance back to the element they copy; the magnitude splits
its relevance in proportion to ``re^2`` and ``im^2``; Log passes relevance (as every activation does). At the
spectrogram, the reference is the graph reference of the model cut at it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_maps import attr
from graph_reference import GraphReference, compiled_plan
from helpers import check_against_graph_reference
from onnx import helper

import onnxlrp

torch = pytest.importorskip("torch")
tm = pytest.importorskip("torch_models")
nn = torch.nn

N_FFT, HOP, SAMPLES, MELS = 32, 16, 256, 8
RULES = ("epsilon", "epsilon-plus-flat", "rlrp")
EXPORTS = ("ts17", "dynamo18")


class WakeWord(nn.Module):
    def __init__(self):
        super().__init__()
        bins = N_FFT // 2 + 1
        t = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64)[:, None]
        window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
        self.real = nn.Conv1d(1, bins, N_FFT, stride=HOP, bias=False)
        self.imag = nn.Conv1d(1, bins, N_FFT, stride=HOP, bias=False)
        self.mel = nn.Conv1d(bins, MELS, 1, bias=False)
        with torch.no_grad():
            self.real.weight.copy_((torch.cos(2 * torch.pi * k * t / N_FFT) * window)[:, None].float())
            self.imag.weight.copy_((-torch.sin(2 * torch.pi * k * t / N_FFT) * window)[:, None].float())
            self.mel.weight.copy_(torch.rand(MELS, bins, 1))
        self.conv1, self.conv2 = nn.Conv1d(MELS, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, wave):
        x = nn.functional.pad(wave, (N_FFT // 2, N_FFT // 2), mode="reflect")
        magnitude = torch.sqrt(self.real(x) ** 2 + self.imag(x) ** 2)
        spectrogram = torch.log(self.mel(magnitude) + 1e-3)
        h = nn.functional.max_pool1d(torch.relu(self.conv1(spectrogram)), 2)
        return self.fc(torch.relu(self.conv2(h)).mean(dim=2))


def waves(n: int = 2) -> np.ndarray:
    return np.random.default_rng(4).normal(size=(n, 1, SAMPLES)).astype(np.float32)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    module = WakeWord().eval()
    x = torch.from_numpy(waves())
    return {name: tm.export(module, x, exporter=tm.EXPORTS[name][0], opset=tm.EXPORTS[name][1]) for name in EXPORTS}


def spectrogram(model: onnx.ModelProto) -> str:
    return next(n.output[0] for n in model.graph.node if n.op_type == "Log")


class AudioReference(GraphReference):
    """The graph reference with the audio front-end: Pad (every mode), the magnitude ``Sqrt(a^2 + b^2)``, Log."""

    def producer(self, tensor):
        return next((n for n in self.nodes if tensor in n.output), None)

    def squared(self, tensor, values):
        node = self.producer(tensor)
        if node is not None and node.op_type == "Mul" and node.input[0] == node.input[1]:
            return node.input[0]
        if node is not None and node.op_type == "Pow" and float(values[node.input[1]]) == 2.0:
            return node.input[0]
        return None

    def backward(self, node, r, values):
        if node.op_type == "Sqrt":
            total = self.producer(node.input[0])
            parts = [self.squared(t, values) for t in total.input] if total.op_type == "Add" else [None]
            if None in parts:
                raise NotImplementedError(f"{node.name}: a square root that is not a magnitude")
            y2 = values[node.output[0]] ** 2
            return [(p, r * values[p] ** 2 / y2, ()) for p in parts]
        if node.op_type == "Log":
            return [(node.input[0], r, ())]
        if node.op_type == "Pad":
            return [(node.input[0], self.pad(node, r, values), ())]
        return super().backward(node, r, values)

    def pad(self, node, r, values):
        """Each output element's relevance to the input element it copies (none for a constant pad's fill)."""
        x = values[node.input[0]]
        pads = np.asarray(values[node.input[1]], np.int64)
        axes = list(values[node.input[3]]) if len(node.input) > 3 and node.input[3] else list(range(x.ndim))
        width = [(0, 0)] * x.ndim
        for k, a in enumerate(axes):
            width[a % x.ndim] = (int(pads[k]), int(pads[k + len(axes)]))
        mode = attr(node, "mode", "constant")
        index = np.arange(x.size).reshape(x.shape)
        sources = np.pad(index, width, mode=mode, constant_values=-1) if mode == "constant" else \
            np.pad(index, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])
        out = np.zeros(x.size)
        keep = sources.reshape(-1) >= 0
        np.add.at(out, sources.reshape(-1)[keep], r.reshape(-1)[keep])
        return out.reshape(x.shape)


def cut_at(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The model from ``tensor`` (a new graph input) on: the nodes that do not depend on what came before it."""
    known = {tensor} | {t.name for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if all(not i or i in known for i in node.input) and tensor not in node.output:
            nodes.append(node)
            known |= set(node.output)
    graph = helper.make_graph(nodes, "cut", [helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)],
                              list(model.graph.output), list(model.graph.initializer))
    return helper.make_model(graph, opset_imports=model.opset_import)


def run(model, x, name=tm.INPUT_NAME):
    session = tm.ort_session(model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {name: x}), strict=True))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("export", EXPORTS)
def test_explained_down_to_the_waveform(exported, export, rule):
    """Every rule, both exporters: the logits bit for bit, the relevance of the waveform against the reference
    (R-LRP: the front-end's three pieces are the same as for the classic rules, the layers Eq. 8-12)."""
    model = exported[export]
    x = waves()
    compiled = onnxlrp.compile(model, rule)
    out = tm.run_compiled(compiled, x)
    np.testing.assert_array_equal(out[tm.OUTPUT_NAME], tm.run_source(model, x))
    assert out["relevance"].shape == x.shape and np.isfinite(out["relevance"]).all()
    reference = AudioReference(model, tm.OUTPUT_NAME, tm.INPUT_NAME)
    check_against_graph_reference(reference, compiled, x, out, rule)
    stft = [n.name for n in model.graph.node if n.op_type == "Conv"][:2]
    assert set(stft) <= set(compiled_plan(compiled))  # the STFT's convolutions are layers with a rule


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("export", EXPORTS)
def test_explained_at_the_spectrogram(exported, export, rule):
    """``node_input=`` the log-mel spectrogram: relevance shaped like it, against the reference of the model cut
    there."""
    model = exported[export]
    x = waves()
    spec = spectrogram(model)
    compiled = onnxlrp.compile(model, rule, node_input=spec)
    out = tm.run_compiled(compiled, x)
    np.testing.assert_array_equal(out[tm.OUTPUT_NAME], tm.run_source(model, x))
    cut = cut_at(model, spec)
    source = onnx.ModelProto()
    source.CopyFrom(model)
    source.graph.output.append(helper.make_tensor_value_info(spec, onnx.TensorProto.FLOAT, None))
    s = run(source, x)[spec]
    assert out["relevance"].shape == s.shape and np.isfinite(out["relevance"]).all()
    check_against_graph_reference(AudioReference(cut, tm.OUTPUT_NAME, spec), compiled, s, out, rule)
