"""What ``onnxlrp explain``, ``onnxlrp evaluate`` and ``onnxlrp demo`` do.

* :func:`run_explain` (:mod:`.explain`) writes one heatmap PNG and the raw relevance (``.npy``) per image file, and
  streams a whole data set into relevance shards and an index (:mod:`.explain_data`).
* :func:`run_evaluate` (:mod:`.evaluate`) runs the R-LRP paper's masked-input study (keep the p % most relevant
  inputs, set the others to 0, measure the accuracy) and region perturbation (MoRF, AOPC) for several rules
  (:mod:`.study`), and writes JSON, CSV and plots.
* :func:`run_flip` (:mod:`.flip`) flips the K least and the K most relevant inputs of every sample and reports
  how the explained class's score changes (the Keras LRP thesis's validation).
* :func:`run_demo` (:mod:`.demo`) does both on the bundled digits CNN.

Shared pieces: compiling and the forward pass (:mod:`.models`), preprocessing (:mod:`.preprocess`), the data sets
both stream (:mod:`.sources`, :mod:`.parquet`), the one per-batch result handler (:mod:`.batches`), the read-ahead
and shard grouping (:mod:`.stream`), the shards, index and resume (:mod:`.shards`), progress (:mod:`.progress`),
the Ray engine (:mod:`.ray_engine`), evaluate's ``--rules`` and ``--percent`` (:mod:`.rulespec`), and the output
files (:mod:`.files`).

Every output file is written through :func:`onnxlrp.io.write_atomic` (a hidden temp file in its folder, renamed
into place), so a file either exists complete or not at all, also on Ctrl-C or SIGTERM.  Every user error is an
:class:`~onnxlrp.errors.OnnxlrpError` with one line.
"""

from .demo import run_demo
from .evaluate import PAPER_PERCENTS, evaluate_rules, run_evaluate
from .explain import run_explain
from .explain_data import load_relevance, run_dataset_explain
from .flip import run_flip
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, make_preprocess
from .rulespec import RuleSpec, parse_rules

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_PERCENTS",
    "RuleSpec",
    "evaluate_rules",
    "load_relevance",
    "make_preprocess",
    "parse_rules",
    "run_demo",
    "run_dataset_explain",
    "run_evaluate",
    "run_explain",
    "run_flip",
]
