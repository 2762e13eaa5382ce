"""The applications of semiring LRP (Groudiev, Sec. 3): class masks, neuron pruning, relevance-weighted
perturbation, and how explain shows a semiring's channels."""

import json

import netspec as ns
import numpy as np
import onnx
import pytest
from helpers import session
from netspec import Flatten, Relu

import onnxlrp
from onnxlrp.apps.masks import run_mask
from onnxlrp.apps.perturbation import perturbed, run_perturb
from onnxlrp.apps.pruning import incoming_weights, masked_forward, run_prune
from onnxlrp.apps.semiring_view import heatmap_view
from onnxlrp.cli import main


def upper_half_model(rng):
    """An MLP on [1, 8, 4] images whose first layer reads only the upper 4 rows: the lower half can have no
    relevant path (Fig. 3.2: the lower digit of a stacked pair)."""
    first = ns.dense(rng, 32, 12)
    first.W[:, 16:] = 0.0
    return [Flatten(), first, Relu(), ns.dense(rng, 12, 3)], (1, 1, 8, 4)


def dataset(tmp_path, rng, shape, n=40, classes=3):
    images = rng.uniform(0.0, 1.0, size=(n, *shape[1:])).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=rng.integers(0, classes, size=n))
    return path, images


def test_masks_are_the_and_and_or_of_boolean_relevance(tmp_path):
    rng = np.random.default_rng(50)
    layers, shape = upper_half_model(rng)
    model_path = tmp_path / "upper.onnx"
    onnx.save(ns.to_onnx(layers, shape), model_path)
    data, images = dataset(tmp_path, rng, shape)
    summary = run_mask(str(model_path), str(data), out_dir=str(tmp_path / "out"))
    compiled = session(onnxlrp.compile(str(model_path), "boolean"))
    relevance, classes = compiled.run(["relevance", "explained_class"], {"x": images})
    marks = np.any(relevance != 0, axis=1)
    assert summary["samples"] == len(images)
    for c in np.unique(classes):
        got_and = np.load(tmp_path / "out" / f"mask_class{c}_and.npy")
        got_or = np.load(tmp_path / "out" / f"mask_class{c}_or.npy")
        np.testing.assert_array_equal(got_and, np.all(marks[classes == c], axis=0))
        np.testing.assert_array_equal(got_or, np.any(marks[classes == c], axis=0))
        frequency = np.load(tmp_path / "out" / f"mask_class{c}_frequency.npy")
        np.testing.assert_allclose(frequency, marks[classes == c].mean(axis=0), rtol=1e-6)
        assert not got_or[4:].any() and got_or[:4].any()  # the lower half is never relevant
        assert (tmp_path / "out" / f"mask_class{c}_or.png").exists()
    assert json.loads((tmp_path / "out" / "masks.json").read_text())["classes"][str(classes[0])]["samples"] > 0


def test_mask_command_one_class(tmp_path, capsys):
    rng = np.random.default_rng(51)
    layers, shape = upper_half_model(rng)
    model_path = tmp_path / "upper.onnx"
    onnx.save(ns.to_onnx(layers, shape), model_path)
    data, _ = dataset(tmp_path, rng, shape)
    assert main(["mask", str(model_path), str(data), "--class", "1", "--combine", "and", "-o",
                 str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "mask_class1_and.npy", "mask_class1_and.png", "mask_class1_frequency.npy", "mask_class1_frequency.png",
        "masks.json"]
    assert main(["mask", str(model_path), str(data), "--combine", "xor", "-o", str(tmp_path / "n")]) != 0
    assert not (tmp_path / "n").exists()


def pruning_model(rng):
    """Hidden neurons 0-3 have no outgoing weights: no relevance reaches them, so every relevance ranking prunes
    them first and the accuracy does not move while they go."""
    hidden = ns.dense(rng, 6, 10)
    out = ns.dense(rng, 10, 3)
    out.W[:, :4] = 0.0
    return [hidden, Relu(), out], (1, 6)


def test_pruning_ranks_and_prunes(tmp_path):
    rng = np.random.default_rng(52)
    layers, shape = pruning_model(rng)
    model = ns.to_onnx(layers, shape)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    logits = session(model).run(None, {"x": x})[0]
    np.savez(tmp_path / "data.npz", images=x, labels=logits.argmax(1))
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    results = run_prune(str(path), str(tmp_path / "data.npz"), tensor=relu, out_dir=str(tmp_path / "out"),
                        rules="lrp0,boolean,counting", steps=[0, 2, 4, 7, 10])
    for method in ("lrp0", "boolean", "counting"):
        entry = results["methods"][method]
        assert set(entry["order"][:4]) == {0, 1, 2, 3}
        assert entry["accuracy"][:3] == [1.0, 1.0, 1.0]
    hidden = layers[0]
    np.testing.assert_array_equal(results["methods"]["L1 norm"]["order"],
                                  np.argsort(np.abs(hidden.W).sum(1), kind="stable"))
    np.testing.assert_array_equal(results["methods"]["L2 norm"]["order"],
                                  np.argsort(np.sqrt((hidden.W ** 2).sum(1)), kind="stable"))
    assert (tmp_path / "out" / "pruning_accuracy.png").exists() and (tmp_path / "out" / "pruning.csv").exists()


def test_masked_forward_prunes_neurons():
    """The pruned model's logits equal the network with those hidden neurons set to 0 (numpy)."""
    rng = np.random.default_rng(53)
    layers, shape = pruning_model(rng)
    model = ns.to_onnx(layers, shape)
    compiled = onnxlrp.compile(model, "lrp0")
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    explained = next(p.value for p in compiled.metadata_props if p.key == "onnxlrp.explained")
    pruned = session(masked_forward(compiled, explained, relu, [10]))
    x = rng.normal(size=(5, 6)).astype(np.float32)
    mask = np.ones(10, np.float32)
    mask[[4, 7]] = 0
    h = np.maximum(x @ layers[0].W.T + layers[0].b, 0) * mask
    expected = h @ layers[2].W.T + layers[2].b
    np.testing.assert_allclose(pruned.run([explained], {"x": x, "onnxlrp_neuron_mask": mask})[0], expected,
                               rtol=1e-5, atol=1e-5)
    assert incoming_weights(compiled, relu).shape == (10, 6)


def test_perturbation_flips_the_drawn_pixels():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) / 23
    order = np.array([[3, 0, 1, 2], [1, 2, 3, 0]])
    out = perturbed(x, order, 2, 0.0, 1.0)
    flat, orig = out.reshape(2, 3, 4), x.reshape(2, 3, 4)
    for s, chosen in enumerate(([3, 0], [1, 2])):
        np.testing.assert_allclose(flat[s][:, chosen], 1 - orig[s][:, chosen])
        others = [p for p in range(4) if p not in chosen]
        np.testing.assert_array_equal(flat[s][:, others], orig[s][:, others])


def test_gumbel_draws_follow_softmax_of_minus_relevance():
    """Eq. 3.3.1: the first pixel drawn is pixel i with probability softmax(-R)_i."""
    rng = np.random.default_rng(54)
    relevance = np.array([0.0, 1.0, 2.5, 0.5])
    keys = rng.gumbel(size=(200_000, 4)) - relevance
    first = np.bincount(np.argmax(keys, axis=1), minlength=4) / len(keys)
    expected = np.exp(-relevance) / np.exp(-relevance).sum()
    np.testing.assert_allclose(first, expected, atol=0.005)


def test_perturb_command(tmp_path):
    rng = np.random.default_rng(55)
    layers = [ns.conv(rng, 1, 2, 3, pad=1), Relu(), Flatten(), ns.dense(rng, 2 * 6 * 6, 3)]
    model = ns.to_onnx(layers, (1, 1, 6, 6))
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    x = rng.uniform(0, 1, size=(20, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=x, labels=session(model).run(None, {"x": x})[0].argmax(1))
    results = run_perturb(str(path), str(tmp_path / "data.npz"), out_dir=str(tmp_path / "out"),
                          rules="boolean,counting", pixels=[0, 5, 36], repeats=2)
    for entry in results["methods"].values():
        assert entry["accuracy"][0] == 1.0  # nothing perturbed, labels are the predictions
    flipped = session(model).run(None, {"x": 1 - x})[0].argmax(1)
    expected_all = float((flipped == results_labels(tmp_path)).mean())
    assert all(entry["accuracy"][2] == pytest.approx(expected_all) for entry in results["methods"].values())
    assert (tmp_path / "out" / "perturbation_gap.png").exists()


def results_labels(tmp_path):
    return np.load(tmp_path / "data.npz")["labels"]


@pytest.mark.parametrize("rule, combine", [("boolean", np.max), ("counting", np.sum), ("viterbi", np.max),
                                           ("epsilon", None)])
def test_heatmap_view_combines_channels_with_plus(rule, combine):
    rng = np.random.default_rng(56)
    layers = [ns.conv(rng, 3, 2, 3, pad=1), Relu(), Flatten(), ns.dense(rng, 2 * 4 * 4, 3)]
    compiled = onnxlrp.compile(ns.to_onnx(layers, (1, 3, 4, 4)), rule)
    r = rng.uniform(0, 1, size=(3, 4, 4))
    view = heatmap_view(compiled)(r)
    np.testing.assert_array_equal(view, r if combine is None else combine(r, axis=0))


def test_heatmap_view_of_max_plus(tmp_path):
    rng = np.random.default_rng(57)
    layers = [ns.conv(rng, 3, 2, 3, pad=1), Relu(), Flatten(), ns.dense(rng, 2 * 4 * 4, 3)]
    toml = tmp_path / "tropical.toml"
    toml.write_text('[semiring]\nplus = "max"\ntimes = "add"\nzero = -1e30\none = 0.0\n'
                    'annotation = "log-abs-normalized"\n')
    compiled = onnxlrp.compile(ns.to_onnx(layers, (1, 3, 4, 4)), composite=toml)
    r = np.full((3, 4, 4), -1e30)
    r[1, 2, 3], r[0, 0, 0] = -1.0, -3.0
    view = heatmap_view(compiled)(r)
    expected = np.zeros((4, 4))
    expected[2, 3], expected[0, 0] = 1.0, np.exp(-2.0)
    np.testing.assert_allclose(view, expected)
