"""Command line: ``onnxlrp compile|inspect|rules|explain|evaluate|web|demo``.

Every user error ends in one line on stderr (``error: ...``) and a non-zero exit code; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import OnnxlrpError
from .messages import explained_line
from .naming import escape_terminal

DEBUG = {"on": False}
PREPROCESS_HELP = ("'none' (pixels/255), 'imagenet' (mean/std), 'caffe' (BGR in 0-255 minus the ImageNet mean), or a "
                   "TOML file with scale, mean, std and channels = \"rgb\" or \"bgr\".")


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, list[int]] | None:
    """``name=1,3,224,224`` (or ``1,3,224,224`` for the only input) -> {name: dims}; -1 or 0 keeps a dim open."""
    shapes = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OnnxlrpError(f"--input-shape {value!r}: expected NAME=D1,D2,... with integer dims") from None
    return shapes or None


def rule_options(fn):
    """Options shared by compile, inspect and explain."""
    options = [
        click.option("--rule", "-r", default="rlrp", show_default=True,
                     help="Rule or composite (see `onnxlrp rules`)."),
        click.option("--composite", type=click.Path(dir_okay=False), help="TOML composite file (overrides --rule)."),
        click.option("--epsilon", type=float, help="Epsilon of the epsilon rule (default 1e-6)."),
        click.option("--gamma", type=float, help="Gamma of the gamma rule (default 0.25)."),
        click.option("--alpha", type=float, help="Alpha of the alpha-beta rule (default 2)."),
        click.option("--beta", type=float, help="Beta of the alpha-beta rule (default 1)."),
        click.option("--low", type=float, help="Lowest input value for z-box (default 0)."),
        click.option("--high", type=float, help="Highest input value for z-box (default 1)."),
        click.option("--stabilizer", type=float,
                     help="Stabilizer of z+, alpha-beta, gamma, flat, w^2, z-box and of the Norm rule at joins and "
                          "average pools (default 1e-6)."),
        click.option("--threshold", type=float,
                     help="Threshold of the boolean and counting semirings (default 1e-9); per layer in a TOML "
                          "composite."),
        click.option("--relevance-at", multiple=True,
                     help="Also output relevance@TENSOR, the relevance of an inner tensor (repeatable)."),
        click.option("--flat-layers", type=int, default=1, show_default=True,
                     help="How many linear layers from the input get the flat rule in *-flat composites and cmp."),
        click.option("--opset", type=int, help="Upgrade the model to this opset first (at least 13)."),
        click.option("--output", "output_name",
                     help="Graph output to explain (default: the class scores: an output made by a Softmax or "
                          "Sigmoid, else the largest [batch, K] one, else the first float output)."),
        click.option("--node-output", help="Intermediate tensor to explain instead of a graph output."),
        click.option("--node-input", multiple=True,
                     help="Intermediate tensor to give relevance to instead of the graph inputs (e.g. a spectrogram "
                          "or an embedding behind a front-end without a rule); repeatable."),
        click.option("--position", type=int,
                     help="Position explained along the sequence axis of a [batch, tokens, classes] output "
                          "(a decoder's logits; negative counts from the end; default: the last)."),
        click.option("--input-shape", multiple=True, help="NAME=D1,D2,... fixes open input dims (repeatable)."),
        click.option("--precision", type=click.Choice(["fp32", "fp16"]),
                     help="fp16: a float16 forward pass (for GPUs); relevance is always float32."),
        click.option("--baseline",
                     help="--rule taylor: the root point x0: zeros (default), mean (the mean sample of "
                          "--baseline-data) or an .npy file holding x0."),
        click.option("--baseline-data", type=click.Path(dir_okay=False),
                     help="--baseline mean: an .npy/.npz of samples [N, ...] whose mean is the baseline."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def compile_kwargs(kw: dict) -> dict:
    names = ("epsilon", "gamma", "alpha", "beta", "low", "high", "stabilizer", "threshold")
    params = {k: kw.pop(k) for k in names if kw.get(k) is not None}
    for k in names:
        kw.pop(k, None)
    return dict(rule=kw.pop("rule"), composite=kw.pop("composite"), flat_layers=kw.pop("flat_layers"),
                opset=kw.pop("opset"), output=kw.pop("output_name"), node_output=kw.pop("node_output"),
                node_input=list(kw.pop("node_input")) or None, relevance_at=list(kw.pop("relevance_at")),
                input_shapes=parse_input_shapes(kw.pop("input_shape")), precision=kw.pop("precision"),
                position=kw.pop("position"), baseline=kw.pop("baseline"), baseline_data=kw.pop("baseline_data"),
                **params)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxlrp")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (anywhere on the line).")
def cli(debug: bool):
    """Compile ONNX models into ONNX models that also compute LRP relevance (R-LRP and classic rules)."""


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@rule_options
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Output file (default: MODEL_STEM.RULE.onnx).")
@click.option("--isolate", is_flag=True, help="Parse and check the model in a child process first.")
def compile_command(model, out, isolate, **kw):
    """Write MODEL compiled with a rule: its outputs plus `relevance` and `explained_class`."""
    from .compiler import compile as compile_model
    from .io import load_model, save_model_atomic

    options = compile_kwargs(kw)
    if isolate:
        load_model(model, isolate=True)  # parse and check in a child process before touching it here
    compiled = compile_model(model, **options)
    label = Path(options["composite"]).stem if options["composite"] else options["rule"]
    target = Path(out) if out else Path(model).with_name(f"{Path(model).stem}.{label}.onnx")
    written = save_model_atomic(compiled, target)
    click.echo(f"wrote {escape_terminal(str(written))} ({label}; outputs: "
               f"{', '.join(escape_terminal(o.name) for o in compiled.graph.output)})")
    meta = {p.key: p.value for p in compiled.metadata_props}
    click.echo(explained_line(meta["onnxlrp.explained"], meta["onnxlrp.explained_why"]))


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@rule_options
def inspect_command(model, **kw):
    """Print the rule plan per node and every unsupported op on the relevance path; writes nothing."""
    from .compiler import inspect as inspect_model

    plan = inspect_model(model, **compile_kwargs(kw))
    click.echo(explained_line(plan.explained, plan.explained_why))
    click.echo(f"relevance inputs: {', '.join(escape_terminal(i) for i in plan.inputs)}")
    click.echo(f"family: {plan.family}")
    if plan.unused_parameters and not plan.unsupported:
        click.echo(f"note: no node of this model uses --{', --'.join(plan.unused_parameters)} (e.g. a first-layer "
                   "z-box on a model whose first layer is not a convolution)")
    for node, rule in plan.rules.items():
        click.echo(f"  {escape_terminal(node)}: {rule}")
    if plan.patterns:
        click.echo(f"{len(plan.patterns)} recognized pattern(s) and gate(s) on the relevance path:")
        for line in plan.patterns:
            click.echo(f"  {escape_terminal(line)}")
    if plan.unsupported:
        click.echo(f"{len(plan.unsupported)} unsupported node(s) on the relevance path:")
        for line in plan.unsupported:
            click.echo(f"  {escape_terminal(line)}")
        sys.exit(2)


@cli.command("rules")
def rules_command():
    """List the rules and composites."""
    from .composites import ALL_RULES, COMPOSITES, DEFAULTS
    from .rules import RULES
    from .semirings import rules_listing

    click.echo("rules (applied to every Conv/Gemm/MatMul):")
    for name in RULES:
        click.echo(f"  {name:28s} {COMPOSITES[name].description}")
    click.echo("rules for joins, pools, resizes, element-wise Max/Min, gates, normalizations, recurrent layers and, in "
               "transformers, offsets, softmax and products of two activations (in a TOML composite; defaults: "
               + ", ".join(f"{kind} -> {cls.name}" for kind, cls in DEFAULTS.items()) + "; offset: unchanged):")
    for name, cls in ALL_RULES.items():
        if name not in RULES:
            click.echo(f"  {name:28s} {cls.summary}")
    click.echo("composites:")
    for name, comp in COMPOSITES.items():
        if name not in RULES and comp.semiring is None:
            click.echo(f"  {name:28s} {comp.description}")
    for line in rules_listing():
        click.echo(line)


@cli.command("explain")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", nargs=-1)
@rule_options
@click.option("--target", default="predicted", show_default=True,
              help="Class index, 'predicted', or 'all' (a heatmap per class in one figure, the .npy [classes, ...]).")
@click.option("--preprocess", default="none", show_default=True, help=PREPROCESS_HELP)
@click.option("-o", "--out-dir", default="onnxlrp-explain", show_default=True)
@click.option("--overlay/--no-overlay", default=True, show_default=True, help="Blend the heatmap over the image.")
@click.option("--batch-size", type=int, help="Samples per batch (default: 32 for image files; for a data set, "
              "from the model's input size: 16 MiB of input, at most 256).")
@click.option("--heatmaps", is_flag=True, help="Data set: also write a heatmap PNG per sample (image files always "
              "get one).")
@click.option("--resume", is_flag=True, help="Data set: continue the interrupted run in --out-dir.")
@click.option("--shard-size", type=int, help="Data set: samples per relevance shard (default: about 32 MiB, at "
              "most 4096, a multiple of the batch size).")
@click.option("--column", help="Parquet: the column holding the images or tensors.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Data set: run in this process, or on a Ray cluster (pip install 'onnxlrp[ray]').")
@click.option("--address", help="Ray: the cluster to join (ray://HOST:10001, HOST:6379 or auto); default: a local "
              "Ray instance, or RAY_ADDRESS.")
@click.option("--num-workers", type=int, help="Ray: explaining actors (default: one per GPU, else one per 4 CPUs).")
@click.option("--threads", type=int, help="Data set: onnxruntime threads (per actor with Ray; default: one per core, "
              "or the CPUs shared among the actors).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (no progress).")
@click.option("--text", "texts", multiple=True,
              help="Explain this text instead of images (repeatable; a model with a token input; rule default "
                   "attnlrp): token relevance as JSON, HTML and PNG.")
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="The tokenizer.json that --text is tokenized with.")
def explain_command(model, data, target, preprocess, out_dir, overlay, batch_size, heatmaps, resume, shard_size,
                    column, engine, address, num_workers, threads, quiet, texts, tokenizer, **kw):
    """Explain image files (a heatmap PNG and the relevance .npy each), one data set (an image folder (recursive),
    a .npy/.npz array or Parquet, streamed into relevance shards and an index, resumable), or the token relevance
    of each --text."""
    if texts:
        from .apps.text import run_explain_text

        if data:
            raise OnnxlrpError("explain: give images or --text, not both")
        if not tokenizer:
            raise OnnxlrpError("explain --text needs --tokenizer tokenizer.json")
        if click.get_current_context().get_parameter_source("rule") == click.core.ParameterSource.DEFAULT:
            kw["rule"] = "attnlrp"
        run_explain_text(model, texts, tokenizer, out_dir=out_dir, target=target, **compile_kwargs(kw))
        return
    if not data:
        raise OnnxlrpError("explain: give at least one image, a folder or a data set (or --text with --tokenizer)")
    from .apps import run_explain

    run_explain(model, data, out_dir=out_dir, target=target, preprocess=preprocess, overlay=overlay,
                batch_size=batch_size, heatmaps=heatmaps, resume=resume, shard_size=shard_size, column=column,
                engine=engine, address=address, num_workers=num_workers, threads=threads, quiet=quiet,
                **compile_kwargs(kw))


@cli.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", default="builtin:digits", show_default=True,
              help="builtin:digits, a folder with one sub-folder per class index, a .npz with images and labels, or "
                   "Parquet with an image or tensor column and a label column; streamed in batches.")
@click.option("--rules", help="Comma-separated rules to compare (default: rlrp,lrp0,epsilon; with --text: "
              "attnlrp,cp-lrp).")
@click.option("--percent", default="1,5,10,15,20,25,40,50,60,75,80,85,90,95,99", show_default=True)
@click.option("--abs", "absolute", is_flag=True, help="Rank by |relevance| instead of signed relevance.")
@click.option("--pixel", is_flag=True, help="Rank pixels by relevance summed over channels.")
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("--preprocess", default="none", show_default=True, help=PREPROCESS_HELP)
@click.option("-o", "--out-dir", default="onnxlrp-evaluate", show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--masks", help="A .npz with object 'masks' [N,H,W] or 'boxes' [N,4] (x0,y0,x1,y1): adds the "
              "pointing game and the relevance mass ratios mu, mu_w.")
@click.option("--column", help="Parquet: the column holding the images or tensors.")
@click.option("--label-column", help="Parquet: the column holding the labels (default: label or labels).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (no progress).")
@click.option("--flip", type=int, help="Instead: the flip test (Keras LRP thesis, Sec. 5.1): flip the K least and, "
              "separately, the K most relevant inputs and report the change of the explained class's score.")
@click.option("--flip-mode", type=click.Choice(["auto", "invert", "negate"]), default="auto", show_default=True,
              help="--flip: invert is x -> 1 - x, negate is x -> -x; auto inverts when the data lie in [0, 1].")
@click.option("--text", "texts", multiple=True, help="A text for a token model (repeatable): the AttnLRP paper's "
              "faithfulness test (remove the most / least relevant tokens first; area between the curves).")
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="tokenizer.json for --text.")
@click.option("--steps", type=int, default=20, show_default=True, help="With --text: removal steps.")
@click.option("--position", type=int, help="With --text: the explained position of a [batch, tokens, classes] output.")
def evaluate_command(model, flip, flip_mode, texts, tokenizer, steps, position, **kw):
    """Masked-input accuracy (the R-LRP paper's study), pixel-flipping AOPC, localization with --masks; CSV, JSON
    and plots. With --flip K: the flip test instead. With --text: token models' faithfulness (MoRF and LeRF token
    removal, delta_AF)."""
    if texts or tokenizer:
        if not (texts and tokenizer):
            raise OnnxlrpError("evaluate --text needs --tokenizer tokenizer.json (and --tokenizer needs --text)")
        if flip is not None:
            raise OnnxlrpError("evaluate: give --flip or --text, not both")
        from .apps.token_faithfulness import run_evaluate_text

        run_evaluate_text(model, texts, tokenizer, rules=kw["rules"] or "attnlrp,cp-lrp", steps=steps,
                          position=position, out_dir=kw["out_dir"])
        return
    from .apps import run_evaluate, run_flip

    kw["rules"] = kw["rules"] or "rlrp,lrp0,epsilon"
    if flip is None:
        run_evaluate(model, **kw)
        return
    if kw["absolute"] or kw["masks"] or kw["column"] or kw["label_column"]:
        raise OnnxlrpError("--flip ranks by signed relevance of in-memory data: no --abs, --masks, --column or "
                           "--label-column")
    run_flip(model, k=flip, mode=flip_mode, data=kw["data"], rules=kw["rules"], pixel=kw["pixel"],
             limit=kw["limit"], preprocess=kw["preprocess"], out_dir=kw["out_dir"], batch_size=kw["batch_size"])


@cli.command("web")
@click.argument("model", type=click.Path(dir_okay=False))
@rule_options
@click.option("--preprocess", default="none", show_default=True,
              help="'none' (pixels/255), 'imagenet' (mean/std), or a TOML file with scale, mean, std.")
@click.option("--ort-web", type=click.Path(), help="onnxruntime-web's folder (default: node_modules/onnxruntime-web "
              "here or above; `npm install onnxruntime-web` fetches it).")
@click.option("-o", "--out-dir", help="Output folder (default: MODEL_STEM-web).")
def web_command(model, preprocess, ort_web, out_dir, **kw):
    """Write a static page bundle that explains images in the browser (WebGPU, else WebAssembly); serve the folder
    with any static server, e.g. `python -m http.server -d DIR`."""
    from .web import write_bundle

    options = compile_kwargs(kw)
    out = write_bundle(model, out_dir, preprocess=preprocess, ort_web=ort_web, **options)
    click.echo(f"wrote {escape_terminal(str(out))}: serve it with `python -m http.server -d "
               f"{escape_terminal(str(out))}` and open http://localhost:8000")


@cli.command("demo")
@click.option("-o", "--out-dir", default="onnxlrp-demo", show_default=True)
def demo_command(out_dir):
    """Compile the bundled digits CNN with R-LRP, explain the bundled samples, run a small evaluation."""
    from .apps import run_demo

    run_demo(out_dir)


@cli.command("mask")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--rule", "-r", default="boolean", show_default=True, help="A semiring (boolean: B-relevance).")
@click.option("--composite", type=click.Path(dir_okay=False), help="TOML composite (per-layer thresholds).")
@click.option("--threshold", type=float, help="Threshold of the boolean semiring (default 1e-9).")
@click.option("--class", "target_class", type=int, help="Only this class (default: every predicted class).")
@click.option("--combine", type=click.Choice(["and", "or", "both"]), default="both", show_default=True)
@click.option("--preprocess", default="none", show_default=True, help=PREPROCESS_HELP)
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("-o", "--out-dir", default="onnxlrp-mask", show_default=True)
def mask_command(model, data, threshold, **kw):
    """Class masks: pixel-wise AND / OR of the B-relevance of every sample of a class (semiring LRP, Sec. 3.1);
    DATA as in evaluate (builtin:digits, .npz, folder)."""
    from .apps.masks import run_mask

    run_mask(model, data, **kw, **({"threshold": threshold} if threshold is not None else {}))


@cli.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--tensor", required=True, help="The inner tensor whose neurons are ranked and pruned.")
@click.option("--rules", default="lrp0,viterbi,boolean,counting", show_default=True,
              help="Rankings by average relevance (L1/L2 weight norms are added).")
@click.option("--rank-data", help="Data to rank the neurons on (default: DATA).")
@click.option("--steps", help="Comma-separated numbers of pruned neurons (default: 0 to all in 25 steps).")
@click.option("--preprocess", default="none", show_default=True, help=PREPROCESS_HELP)
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("-o", "--out-dir", default="onnxlrp-prune", show_default=True)
def prune_command(model, data, steps, **kw):
    """Neuron ranking by average relevance and pruning curves (accuracy, loss) against L1/L2 norms (Sec. 3.2)."""
    from .apps.pruning import run_prune

    run_prune(model, data, steps=parse_counts(steps, "--steps"), **kw)


@cli.command("perturb")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--rules", default="lrp0,viterbi,boolean,counting", show_default=True)
@click.option("--pixels", help="Comma-separated pixel counts (default: 0 to half the image in 10 steps).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Random draws averaged.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preprocess", default="none", show_default=True, help=PREPROCESS_HELP)
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("-o", "--out-dir", default="onnxlrp-perturb", show_default=True)
def perturb_command(model, data, pixels, **kw):
    """Accuracy when pixels drawn with P = softmax(-R) are perturbed, against uniform draws (Sec. 3.3)."""
    from .apps.perturbation import run_perturb

    run_perturb(model, data, pixels=parse_counts(pixels, "--pixels"), **kw)


def parse_counts(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise OnnxlrpError(f"{option} {text!r}: expected comma-separated integers") from None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 1 (2 for unsupported ops)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        argv.remove("--debug")
        DEBUG["on"] = True
    try:
        cli.main(args=argv, prog_name="onnxlrp", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except OnnxlrpError as err:
        if DEBUG["on"]:
            raise
        click.echo(f"error: {escape_terminal(str(err))}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns any failure into one line
        if DEBUG["on"]:
            raise
        first_line = str(err).splitlines()[0] if str(err) else ""
        click.echo(f"error: internal error ({type(err).__name__}: {escape_terminal(first_line)}); "
                   "run with --debug for the traceback", err=True)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
