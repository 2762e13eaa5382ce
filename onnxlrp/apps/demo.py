"""``onnxlrp demo``: the whole tour on the bundled digits CNN."""

from __future__ import annotations

import click

from onnxlrp.io import save_model_atomic, sigterm_guard
from onnxlrp.messages import show

from .evaluate import run_evaluate
from .explain import run_explain
from .files import check_out_dir, ensure_dir, models_dir

__all__ = ["run_demo"]


def run_demo(out_dir="onnxlrp-demo") -> dict:
    """Compile the bundled digits CNN with R-LRP, explain the 10 bundled samples, run a small evaluation."""
    from onnxlrp.compiler import compile as compile_model

    check_out_dir(out_dir)
    models = models_dir()
    source = models / "digits_cnn.onnx"
    out = ensure_dir(out_dir)
    with sigterm_guard("onnxlrp demo"):
        compiled_path = save_model_atomic(compile_model(str(source), "rlrp"), out / "digits_cnn.rlrp.onnx")
        click.echo(f"compiled {show(source.name)} with rlrp -> {show(compiled_path)}")
        explained = run_explain(str(compiled_path), [str(models / "samples")], out_dir=out / "heatmaps",
                                target="predicted", preprocess="none", overlay=True, batch_size=32, rule="rlrp")
        results = run_evaluate(str(source), data="builtin:digits", rules="rlrp,lrp0,epsilon", limit=200,
                               out_dir=out / "evaluate")
    click.echo("")
    click.echo(f"compiled model:   {show(compiled_path)}")
    click.echo(f"heatmaps (PNG):   {show(out / 'heatmaps')}/*.png")
    click.echo(f"relevance (.npy): {show(out / 'heatmaps')}/*.npy  (float32 [1, 28, 28] each, "
               "numpy.load(path))")
    click.echo(f"evaluation:       {show(out / 'evaluate')}/results.json, results.csv, masked_accuracy.png, "
               "aopc.png")
    return {"compiled": str(compiled_path), "explained": explained, "evaluate": results}
