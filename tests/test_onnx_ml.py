"""Classic classifiers as skl2onnx writes them (``ai.onnx.ml``, issue 22): the lowering keeps every output, linear
models and linear SVMs decompose exactly into ``w_d x_d`` (against scikit-learn's float64 coefficients), kernel SVMs
through the Taylor rule match float64 finite differences of scikit-learn's decision function, bag-of-words models
are explained per word, and tree ensembles are refused in one line."""

import functools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import session
from onnx import helper

import onnxlrp
from onnxlrp.errors import OnnxlrpError

pytest.importorskip("skl2onnx")
from skl2onnx import convert_sklearn, to_onnx  # noqa: E402
from skl2onnx.common.data_types import StringTensorType  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler, Normalizer, StandardScaler  # noqa: E402
from sklearn.svm import SVC, SVR, LinearSVC  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.normal(size=(80, 5)).astype(np.float32)
BINARY = (X[:, 0] + X[:, 1] - X[:, 3] > 0).astype(int)
THREE = (X[:, 0] > 0).astype(int) + (X[:, 2] > 0.5)
TARGET = X[:, 0] - 0.5 * X[:, 2] ** 2


def fitted(name):
    models = {
        "logistic_scaler": (make_pipeline(StandardScaler(), LogisticRegression()), BINARY),
        "logistic3_normalizer": (make_pipeline(Normalizer(), LogisticRegression()), THREE),
        "logistic3_l1": (make_pipeline(Normalizer(norm="l1"), LogisticRegression()), THREE),
        "logistic3_max": (make_pipeline(Normalizer(norm="max"), LogisticRegression()), THREE),
        "linear_regression_minmax": (make_pipeline(MinMaxScaler(), LinearRegression()), TARGET),
        "linear_svc": (LinearSVC(), BINARY),
        "linear_svc3": (LinearSVC(), THREE),
        "svc_linear": (SVC(kernel="linear"), BINARY),
        "svc_rbf": (SVC(kernel="rbf"), BINARY),
        "svc_poly": (SVC(kernel="poly", coef0=1.0), BINARY),
        "svc_sigmoid": (SVC(kernel="sigmoid", gamma=0.05), BINARY),
        "svr_rbf": (SVR(kernel="rbf"), TARGET),
        "svr_linear": (SVR(kernel="linear"), TARGET),
    }
    model, y = models[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y)


@functools.cache
def exported(name) -> tuple[object, bytes]:
    model = fitted(name)
    last = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {id(last): {"zipmap": False}} if isinstance(last, (LogisticRegression, SVC)) else None
    return model, to_onnx(model, X[:1], options=options).SerializeToString()


def outputs(model: onnx.ModelProto, x, target=None, **kwargs):
    compiled = onnxlrp.compile(model, **kwargs)
    sess = session(compiled)
    feeds = {"X": x.astype(np.float32)}
    if target is not None:
        feeds["target"] = np.full(len(x), target, np.int64)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


@pytest.mark.parametrize("name", ["logistic_scaler", "logistic3_normalizer", "logistic3_l1", "logistic3_max",
                                  "linear_regression_minmax", "linear_svc", "linear_svc3", "svc_linear", "svc_rbf",
                                  "svc_poly", "svc_sigmoid", "svr_rbf", "svr_linear"])
def test_lowering_keeps_every_output(name):
    _, data = exported(name)
    model = onnx.load_from_string(data)
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"X": X[:20]})
    # the LRP rules refuse x * x, Exp and the quotients of the L1 and MAX normalizers
    rule = "taylor" if name in ("svc_rbf", "svr_rbf", "logistic3_l1", "logistic3_max") else "epsilon"
    got = outputs(model, X[:20], rule=rule)
    for info, value in zip(model.graph.output, expected, strict=True):
        if value.dtype.kind in "iub":
            np.testing.assert_array_equal(got[info.name].reshape(value.shape), value)
        else:
            np.testing.assert_allclose(got[info.name].reshape(value.shape), value, rtol=1e-5, atol=1e-5)
    assert all(n.domain != "ai.onnx.ml" for n in onnxlrp.compile(model, rule=rule).graph.node)


def class_weights(model, name):
    """(W [columns, features], b) of the explained columns in the model's raw feature space before the scaler,
    and the scaler's map z(x), all float64 from scikit-learn."""
    last = model.steps[-1][1] if hasattr(model, "steps") else model
    coef, intercept = np.atleast_2d(last.coef_).astype(np.float64), np.atleast_1d(last.intercept_).astype(np.float64)
    if name in ("logistic_scaler", "svc_linear") and len(coef) == 1:
        # two columns: the logistic's [-s, s]; the SVC's [decision, -decision] (onnxruntime's order). A binary
        # LinearSVC has one, its decision.
        sign = 1.0 if name == "logistic_scaler" else -1.0
        coef, intercept = np.concatenate([-sign * coef, sign * coef]), np.concatenate([-sign * intercept,
                                                                                        sign * intercept])
    scale = model.steps[0][1] if hasattr(model, "steps") else None
    return coef, intercept, (scale.transform if scale is not None else (lambda v: v))


@pytest.mark.parametrize("name", ["logistic_scaler", "linear_regression_minmax", "linear_svc", "linear_svc3",
                                  "svc_linear"])
@pytest.mark.parametrize("column", [0, 1])
def test_linear_models_decompose_into_weights_times_features(name, column):
    """LRP-0: R_d = w_cd z_d with z the scaled features (the bias stays out: sum R = f_c(x) - b_c); the Taylor rule
    at zeros: R_d = w'_cd x_d in the raw features, f(0) carries the bias and the scaler's offset, no residual."""
    model, data = exported(name)
    onnx_model = onnx.load_from_string(data)
    coef, intercept, scaled = class_weights(model, name)
    if column >= len(coef):
        pytest.skip("a single output")
    x = X[:10].astype(np.float64)
    z = scaled(x)
    out = outputs(onnx_model, x, target=column, rule="lrp0")
    expected = coef[column] * z
    np.testing.assert_allclose(out["relevance"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    logit = z @ coef[column] + intercept[column]
    np.testing.assert_allclose(out["relevance"].sum(1), logit - intercept[column], rtol=1e-4, atol=1e-5)

    taylor = outputs(onnx_model, x, target=column, rule="taylor")
    zero = scaled(np.zeros((1, x.shape[1])))
    raw_weight = (scaled(np.eye(x.shape[1])) - zero).T @ coef[column]  # the chain rule through the affine scaler
    np.testing.assert_allclose(taylor["relevance"], raw_weight * x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(taylor["taylor_root_value"], np.full(len(x), zero[0] @ coef[column] +
                                                                    intercept[column]), rtol=1e-5, atol=1e-5)
    assert np.abs(taylor["taylor_residual"]).max() < 1e-4


def decision(model, name, column):
    """The explained column as scikit-learn computes it (float64): onnxruntime's binary SVC scores [-d, d] with
    d = -decision_function."""
    if name.startswith("svr"):
        return lambda v: model.predict(v)
    if name == "logistic3_max":  # ONNX-ML's MAX norm divides by max(x); scikit-learn's by max(|x|)
        return lambda v: model[-1].decision_function(v / v.max(1, keepdims=True))[:, column]
    if name.startswith("logistic3"):
        return lambda v: model.decision_function(v)[:, column]
    sign = 1.0 if column == 0 else -1.0
    return lambda v: sign * model.decision_function(v)


@pytest.mark.parametrize("name", ["svc_rbf", "svc_poly", "svc_sigmoid", "svr_rbf", "logistic3_l1", "logistic3_max",
                                  "logistic3_normalizer"])
def test_kernel_svms_and_normalizers_through_taylor_match_finite_differences(name, tmp_path):
    model, data = exported(name)
    x0 = X.mean(0, keepdims=True).astype(np.float64)
    np.save(tmp_path / "data.npy", X)
    x = X[20:26].astype(np.float64)
    column = 0
    out = outputs(onnx.load_from_string(data), x, target=column, rule="taylor", baseline="mean",
                  baseline_data=str(tmp_path / "data.npy"))
    f = decision(model, name, column)
    h = 1e-5
    grad = np.array([(f(x0 + h * e) - f(x0 - h * e))[0] / (2 * h) for e in np.eye(x.shape[1])])
    expected = grad * (x - x0)
    np.testing.assert_allclose(out["relevance"], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    np.testing.assert_allclose(out["taylor_root_value"], np.full(len(x), f(x0)[0]), rtol=1e-4, atol=1e-4)
    residual = f(x) - f(x0)[0] - expected.sum(1)
    np.testing.assert_allclose(out["taylor_residual"], residual, rtol=5e-3, atol=2e-3)
    assert np.abs(residual).max() > 1e-2  # a curved decision function: the first order leaves a remainder


DOCS = ["good great film", "bad awful film", "great acting good story", "awful plot bad acting", "good fun film",
        "boring bad plot", "great fun", "awful boring film"]
SENTIMENT = [1, 0, 1, 0, 1, 0, 1, 0]


def test_bag_of_words_outside_the_graph_per_word():
    vectorizer = CountVectorizer().fit(DOCS)
    counts = vectorizer.transform(DOCS).toarray().astype(np.float32)
    clf = LinearSVC().fit(counts, SENTIMENT)
    model = to_onnx(clf, counts[:1])
    texts = ["good film with great acting", "bad boring plot"]
    features = vectorizer.transform(texts).toarray().astype(np.float32)
    out = outputs(model, features, target=0, rule="lrp0")  # column 0: the decision for "positive"
    expected = clf.coef_[0].astype(np.float64) * features
    np.testing.assert_allclose(out["relevance"], expected, rtol=1e-5, atol=1e-6)
    words = vectorizer.get_feature_names_out()
    per_word = [{words[i]: r[i] for i in np.flatnonzero(f)} for r, f in zip(out["relevance"], features, strict=True)]
    assert max(per_word[0], key=per_word[0].get) in ("good", "great") and min(per_word[1].values()) < 0
    assert set(per_word[0]) == {"good", "film", "great", "acting"}  # "with" is not in the vocabulary


def test_bag_of_words_inside_the_graph_per_word():
    """TfidfVectorizer + LinearSVC converted whole (string input): explained at the TfIdfVectorizer's output
    (--node-input); the L2 Normalizer after it is a normalization (its norm a per-sample constant), so LRP-0 gives
    R_word = w_word * tfidf_word, tfidf as scikit-learn's transform computes it."""
    pipeline = make_pipeline(TfidfVectorizer(), LinearSVC()).fit(DOCS, SENTIMENT)
    model = convert_sklearn(pipeline, initial_types=[("text", StringTensorType([None, 1]))],
                            options={LinearSVC: {"raw_scores": True}})
    for node in model.graph.node:  # this machine has no en_US locale, onnxruntime's StringNormalizer default
        if node.op_type == "StringNormalizer":
            node.attribute.extend([helper.make_attribute("locale", "C.utf8")])
    counts = next(n.output[0] for n in model.graph.node if n.op_type == "TfIdfVectorizer")
    compiled = onnxlrp.compile(model, "lrp0", node_input=counts)
    texts = ["good film with great acting", "bad boring plot"]
    sess = session(compiled)
    relevance = sess.run(["relevance"], {"text": np.array([[t] for t in texts]),
                                         "target": np.zeros(2, np.int64)})[0]
    tfidf = pipeline[0].transform(texts).toarray()
    column_sign = -1.0  # onnxruntime's binary LinearClassifier from LinearSVC scores [-d, d]: column 0 is -d
    expected = column_sign * pipeline[1].coef_[0] * tfidf
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6)


def test_tree_ensembles_and_unlowered_svms_are_refused_in_one_line():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(X, BINARY)
        ovo = SVC().fit(X, THREE)
        platt = SVC(probability=True, random_state=0).fit(X, BINARY)
    cases = [(forest, "tree ensembles have no relevance rule"), (ovo, "one-versus-one SVMs with more than two"),
             (platt, "Platt-scaled probabilities")]
    for model, message in cases:
        onx = to_onnx(model, X[:1], options={id(model): {"zipmap": False}})
        with pytest.raises(OnnxlrpError, match=message) as err:
            onnxlrp.compile(onx, "epsilon")
        assert "\n" not in str(err.value)
