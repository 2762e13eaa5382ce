"""Element-wise ops: activations that pass relevance, arithmetic with constants, joins of branches, and the facts of
ops that carry no relevance at all."""

from __future__ import annotations

from .helpers import path_inputs, unbroadcast
from .registry import backward, declare

# ---------------------------------------------------------------- ops whose output carries no relevance

declare("Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
        "Or", "Xor", "NonZero", "IsNaN", "IsInf", "TopK", "ConstantOfShape", "Constant", "EyeLike", data_inputs=())
declare("RandomNormalLike", "RandomUniformLike", data_inputs=(), foldable=False)
declare("RandomNormal", "RandomUniform", "Multinomial", foldable=False)


def control_flow_reason(ctx, node):
    if node.op_type == "If":
        return "an If whose condition is not a constant has no relevance rule (one with a constant condition is " \
               "replaced by its branch)"
    return f"control flow ({node.op_type}) has no relevance rule"


declare("If", "Loop", "Scan", foldable=False, check=control_flow_reason)
declare("Reciprocal", check=lambda ctx, node: "the reciprocal of a relevance-carrying tensor has no LRP rule (on "
        "constants it is folded; inside x * f(x) activations it is part of the activation)")
declare("Exp", nonnegative="always")
declare("LpPool", nonnegative="first")
declare("ReduceMax", "ReduceMin", data_inputs=(0,), nonnegative="first")
declare("ReduceSum", data_inputs=(0,))
declare("Tile", data_inputs=(0,), nonnegative="first")
declare("Upsample", "ConvTranspose", data_inputs=(0,))  # Upsample: Resize after canonicalization


# ---------------------------------------------------------------- pass-through ops

def clip_nonnegative(is_nonneg, node, tensor) -> bool:
    """A Clip is ``>= 0`` when its lower bound is."""
    low = node.input[1] if len(node.input) > 1 else ""
    return bool(low) and is_nonneg(low)


def clip_preserves_zero(ctx, node, index) -> bool:
    """A Clip maps 0 to 0 unless its bounds exclude 0."""
    bounds = [ctx.constants.get(n) if n else None for n in list(node.input[1:3]) + [""] * 2][:2]
    return not ((bounds[0] is not None and bounds[0] > 0) or (bounds[1] is not None and bounds[1] < 0))


def pass_through(ctx, node, r_out):
    """Activations and element-wise maps: relevance passes unchanged (Zennit's Pass rule). A BatchNormalization
    after a linear layer is folded into that layer's rule; any other is a per-channel affine map and passes."""
    return {0: r_out[0]}


backward("Relu", "Abs", nonnegative="always", zero_preserving=True)(pass_through)
backward("Sigmoid", "Softplus", nonnegative="always")(pass_through)
backward("Clip", data_inputs=(0,), nonnegative=clip_nonnegative, zero_preserving=clip_preserves_zero)(pass_through)
backward("LeakyRelu", "PRelu", "Tanh", "Neg", zero_preserving=True)(pass_through)
backward("Identity", "Cast", shape_only=True, nonnegative="first", zero_preserving=True)(pass_through)
backward("Dropout", data_inputs=(0,), nonnegative="first", zero_preserving=True)(pass_through)
backward("BatchNormalization", data_inputs=(0,), fusable_producer=True)(pass_through)
backward("ElementwiseActivation", fused=True, data_inputs=(0,), zero_preserving=True)(pass_through)
backward("Elu", "Selu", "Celu", "Gelu", "Softsign", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "LRN",
         "Erf", "Log", "Sqrt")(pass_through)


def check_power(ctx, node):
    return None if node.input[1] in ctx.constants else "a power with a relevance-carrying exponent has no LRP rule"


backward("Pow", data_inputs=(0,), check=check_power)(pass_through)


# ---------------------------------------------------------------- element-wise arithmetic and joins

def check_arith(ctx, node):
    on_path = path_inputs(ctx, node)
    if node.op_type == "Div" and len(on_path) > 1:
        return "a quotient of two relevance-carrying tensors has no LRP rule"
    if node.op_type == "Div" and on_path == [1]:
        return "a division by a relevance-carrying tensor has no LRP rule"
    return None


def add(ctx, node, r_out):
    """With one relevance input (the others constant) relevance maps back unchanged, or, when the composite has a
    rule for the kind ``offset`` (AttnLRP), the constant keeps its share. With several, the node joins
    branches and the rule the family planned for it splits ``R`` (classic: Zennit's Norm rule; R-LRP: Prop. 14).
    A Sub's second operand enters negated."""
    r = r_out[0]
    on_path = path_inputs(ctx, node)
    if len(on_path) == 1:
        i = on_path[0]
        rule = ctx.plan.get(node.name)  # an offset (the other operand carries no relevance) under an offset rule
        if rule is not None:
            r = rule.offset(ctx, node, r, i)
        return {i: unbroadcast(ctx, r, node.input[i], node.output[0])}
    shares = ctx.rule(node).join(ctx, node, r, on_path)
    out = {i: unbroadcast(ctx, v, node.input[i], node.output[0]) for i, v in shares.items()}
    ctx.join_shares.update({(node.name, i): v for i, v in out.items()})
    return out


backward("Add", "Sum", join=True, kind="join", nonnegative="all", check=check_arith)(add)
backward("Sub", join=True, kind="join", check=check_arith)(add)


def divides_data_input(ctx, node, index) -> bool:
    """A division of the data input by a constant maps 0 to 0."""
    return index == 0


@backward("Div", nonnegative="all", zero_preserving=divides_data_input, check=check_arith)
def scale(ctx, node, r_out):
    """A division by a constant: relevance maps back unchanged (Zennit's Pass rule); products are in
    :mod:`onnxlrp.passes.ops.gates`."""
    (i,) = path_inputs(ctx, node)
    return {i: unbroadcast(ctx, r_out[0], node.input[i], node.output[0])}
