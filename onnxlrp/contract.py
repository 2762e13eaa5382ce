"""The names a compiled model adds to its source: one place for the compiler, the runtime and the apps.

- ``target`` (int64 ``[batch]``, a required input): the class explained per sample; -1 means the arg-max of the
  explained output. It is a plain graph input, not an initializer-backed default, so that every runtime lists and
  accepts it (onnxruntime-web and onnxruntime-node only know inputs without initializers, and onnxruntime logs a
  warning for an initializer that is also an input); :class:`onnxlrp.runtime.Explainer` feeds -1 when no target is
  given.
- ``relevance`` (float32, shaped like the data input), or ``relevance.<input name>`` per float input when there are
  several.
- ``explained_class`` (int64 ``[batch]``): the class that was explained.
"""

TARGET_INPUT = "target"
RELEVANCE_OUTPUT = "relevance"
CLASS_OUTPUT = "explained_class"
PREDICTED = -1  # the value of ``target`` that means "the arg-max"


def relevance_output(input_name: str, single: bool) -> str:
    """The relevance output of data input ``input_name``: ``relevance`` when it is the only one."""
    return RELEVANCE_OUTPUT if single else f"{RELEVANCE_OUTPUT}.{input_name}"


def is_relevance_output(name: str) -> bool:
    return name == RELEVANCE_OUTPUT or name.startswith(RELEVANCE_OUTPUT + ".")
