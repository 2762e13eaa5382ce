"""``onnxlrp web`` in a real browser: Debian's headless Chromium, driven by Playwright's Python package with the
system browser (no browser download), on bundles served by ``python -m http.server``.

The bundled digits model's relevance in the page (WebAssembly, and WebGPU on SwiftShader) equals onnxruntime's
(Python, CPU provider, on the same model file) within 1e-5 of the map's peak, for three rules, with ``target`` -1
(the predicted class) and 3; drawing a digit on the pad shows its heatmap (the screenshot's pixels are the colours
of Python's relevance of what the page fed the model); the page fetches nothing but its own files."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from js_support import CHROMIUM_FLAGS, chromium, http_server, missing, ort_web
from PIL import Image

from onnxlrp.cli import main
from onnxlrp.web import ORT_FILES, TESTED_ORT_WEB

DIGITS = "models/digits_cnn.onnx"
RULES = ["rlrp", "epsilon-plus-flat", "epsilon-alpha2-beta1"]
TARGETS = [-1, 3]
TOLERANCE = 1e-5  # of the map's peak


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One bundle per rule under one folder, served by ``python -m http.server``."""
    dist = ort_web()
    root = tmp_path_factory.mktemp("site")
    for rule in RULES:
        assert main(["web", DIGITS, "--rule", rule, "-o", str(root / rule), "--ort-web", str(dist)]) == 0
    with http_server(root) as base:
        yield root, base


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the Python package playwright is not installed")
    executable = chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def samples(n: int = 2) -> np.ndarray:
    data = np.load("models/digits_test.npz")
    images = data[next(k for k in data.files if data[k].ndim >= 3)][:n]
    return images.reshape(n, 1, 28, 28).astype(np.float32)


def python_relevance(model_path, x: np.ndarray, target: int) -> tuple[np.ndarray, int]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    relevance, cls = session.run(["relevance", "explained_class"], {"image": x[None], "target": np.array([target])})
    return relevance[0], int(cls[0])


def open_page(browser, url: str, backend: str):
    """The page at ``url`` with ``backend`` forced, once it is ready; and the URLs it requested."""
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{url}?backend={backend}")
    if backend == "webgpu" and not page.evaluate("async () => Boolean(navigator.gpu && "
                                                 "await navigator.gpu.requestAdapter())"):
        page.close()
        pytest.skip("this headless Chromium offers no WebGPU adapter (--enable-unsafe-webgpu on SwiftShader)")
    page.wait_for_function("window.onnxlrp && (window.onnxlrp.backend || "
                           "document.querySelector('#status').className === 'error')", timeout=180_000)
    assert not errors, errors
    assert page.evaluate("window.onnxlrp.backend") == backend, page.text_content("#status")
    return page, requested


@pytest.mark.parametrize("backend", ["wasm", "webgpu"])
@pytest.mark.parametrize("rule", RULES)
def test_page_explains_like_python(site, browser, rule, backend):
    root, base = site
    page, requested = open_page(browser, f"{base}{rule}/", backend)
    try:
        assert page.text_content("#rule") == rule
        assert page.text_content("#backend") == {"wasm": "WebAssembly (CPU)", "webgpu": "WebGPU"}[backend]
        for x in samples():
            for target in TARGETS:
                got = page.evaluate("async ([pixels, target]) => { const r = await onnxlrp.explain("
                                    "Float32Array.from(pixels), target); return {relevance: Array.from(r.relevance), "
                                    "cls: r.explainedClass, ms: r.ms}; }", [x.ravel().tolist(), target])
                want, cls = python_relevance(root / rule / "model.onnx", x, target)
                assert got["cls"] == cls
                deviation = np.abs(np.asarray(got["relevance"]).reshape(want.shape) - want).max()
                assert deviation <= TOLERANCE * np.abs(want).max(), (rule, backend, target, deviation)
                assert got["ms"] > 0
        assert all(url.startswith(base) for url in requested), [u for u in requested if not u.startswith(base)]
        assert any(url.endswith(".wasm") for url in requested)
    finally:
        page.close()


def bwr(v: np.ndarray) -> np.ndarray:
    """Matplotlib's "bwr" colour map at ``v`` in [-1, 1], as 0..255 RGB."""
    t = (v + 1) / 2
    low = np.stack([2 * t, 2 * t, np.ones_like(t)], -1)
    high = np.stack([np.ones_like(t), 2 * (1 - t), 2 * (1 - t)], -1)
    return np.round(255 * np.where((t < 0.5)[..., None], low, high))


def test_drawing_a_digit_shows_its_heatmap(site, browser, tmp_path):
    """Draw a 7 on the pad with the mouse: the page explains while the pen moves, and the heatmap's pixels in a
    screenshot are the colours of Python's relevance of the image the page fed the model (each canvas pixel is a
    10x10 block on screen)."""
    root, base = site
    page, _ = open_page(browser, f"{base}rlrp/", "wasm")
    try:
        box = page.locator("#pad").bounding_box()
        corners = [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]
        page.mouse.move(box["x"] + box["width"] * corners[0][0], box["y"] + box["height"] * corners[0][1])
        page.mouse.down()
        for (x0, y0), (x1, y1) in zip(corners, corners[1:], strict=False):
            for step in range(1, 11):
                f = step / 10
                page.mouse.move(box["x"] + box["width"] * (x0 + f * (x1 - x0)),
                                box["y"] + box["height"] * (y0 + f * (y1 - y0)))
        page.mouse.up()
        page.wait_for_function("window.onnxlrp.last && !window.onnxlrp.busy()")
        runs = int(page.text_content("#time").split(" over ")[1].rstrip(")"))
        assert runs >= 2  # explained while drawing, not only at the end
        pixels = np.asarray(page.evaluate("Array.from(window.onnxlrp.last.pixels)"), np.float32).reshape(1, 28, 28)
        assert 0.05 < pixels.mean() < 0.5  # the stroke, scaled into the digit box
        relevance, cls = python_relevance(root / "rlrp" / "model.onnx", pixels, -1)
        assert page.text_content("#class").startswith(f"{cls} (score")
        shot = Image.open(io.BytesIO(page.locator("#heatmap").screenshot(path=tmp_path / "heatmap.png")))
        screen = np.asarray(shot.convert("RGB"), dtype=np.float64)
        cells = screen[1 + 5::10, 1 + 5::10][:28, :28]  # the centre of each 10x10 block, inside the 1 px border
        summed = relevance.sum(0)
        expected = bwr(summed / np.abs(summed).max())
        assert np.abs(cells - expected).max() <= 3, np.abs(cells - expected).max()
        strong = (cells[..., 0] > 200) & (cells[..., 1] < 128)  # clearly red: strongly positive relevance
        assert 5 <= strong.sum() < 28 * 28 / 2
        page.screenshot(path=tmp_path / "page.png")
    finally:
        page.close()


# ---------------------------------------------------------------- the command (no browser needed)

@pytest.fixture()
def fake_ort_web(tmp_path):
    """A folder shaped like onnxruntime-web's package (the files' content does not matter to the command)."""
    dist = tmp_path / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    for name in ORT_FILES:
        (dist / name).write_bytes(b"// " + name.encode())
    (dist.parent / "package.json").write_text(json.dumps({"version": TESTED_ORT_WEB}))
    return dist.parent


def test_web_writes_a_complete_bundle_and_replaces_only_its_own(tmp_path, fake_ort_web, capsys):
    out = tmp_path / "site"
    assert main(["web", DIGITS, "--rule", "epsilon", "-o", str(out), "--ort-web", str(fake_ort_web)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["app.js", "config.json", "index.html", "model.onnx", "ort",
                                                     "style.css"]
    assert sorted(p.name for p in (out / "ort").iterdir()) == sorted([*ORT_FILES, "NOTICE.txt"])
    config = json.loads((out / "config.json").read_text())
    assert (config["rule"], config["shape"], config["classes"], config["pad"]) == ("epsilon", [1, 28, 28], 10, True)
    assert config["ort"]["version"] == TESTED_ORT_WEB
    model = onnx.load(out / "model.onnx")
    assert {i.name for i in model.graph.input} == {"image", "target"}
    # a second run replaces the earlier bundle; nothing else is left beside it
    assert main(["web", DIGITS, "--rule", "rlrp", "-o", str(out), "--ort-web", str(fake_ort_web)]) == 0
    assert json.loads((out / "config.json").read_text())["rule"] == "rlrp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnxruntime-web", "site"]


def test_web_refuses_in_one_line(tmp_path, fake_ort_web, capsys):
    # no onnxruntime-web: what to install
    assert main(["web", DIGITS, "-o", str(tmp_path / "a"), "--ort-web", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "npm install onnxruntime-web@" in err and len(err.strip().splitlines()) == 1
    # a folder that holds other files is not overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["web", DIGITS, "-o", str(other), "--ort-web", str(fake_ort_web)]) == 1
    assert "holds other files" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    # not an image model
    import netspec as ns
    from spec_zoo import ZOO

    layers, shape = ZOO["mlp"](np.random.default_rng(0))
    onnx.save(ns.to_onnx(layers, shape), tmp_path / "mlp.onnx")
    assert main(["web", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "b"), "--ort-web", str(fake_ort_web)]) == 1
    assert "the page explains images" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
