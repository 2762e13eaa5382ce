"""A float64 LRP reference on PyTorch modules, written from the equations (test-only).

:class:`Tape` runs a model's forward pass in float64 op by op (its own forward for each module type, so nothing of
the ONNX graph or the compiler is reused) and records, for each op, how relevance flows back through it. The rules are
the ones the README states for ``--rule epsilon`` (and the gate rule chosen):

- Conv2d/Linear ``z = W x + b`` (a BatchNorm2d right after a Conv2d folded in): ``R_x = x * W^T (R / stab(z))``,
  ``stab(z) = z + eps sign(z)`` (``sign(0) = +1``), ``W^T`` a transposed convolution or matrix product;
- average pooling ``z = mean(x)`` and residual joins ``z = a + b``: Zennit's Norm rule (the epsilon rule without bias);
- max pooling: each window's relevance to its arg-max (the gradient's routing);
- element-wise activations (ReLU, SiLU, Hardswish, GELU, Mish, Sigmoid, Hardsigmoid), a product with a constant
  (ConvNeXt's layer scale), Dropout, stochastic depth, flatten/permute/chunk/cat: relevance passes or is re-indexed;
- gates ``y = g * v`` (squeeze-and-excitation): ``value`` ``R_v = R``; ``uniform`` ``R_v = R_g = R / 2`` (summed over
  the axes along which each factor was broadcast);
- LayerNorm (and torchvision's LayerNorm2d): ``R_x = x * (h - mean(h))``, ``h = w * R / (sigma * stab(y))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def stab(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def unbroadcast(r: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``r`` over the axes along which a tensor of ``shape`` was broadcast to ``r``'s shape."""
    axes = [a for a, (d, e) in enumerate(zip(shape, r.shape, strict=True)) if d == 1 and e != 1]
    return r.sum(axes, keepdim=True) if axes else r


ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.Sigmoid, nn.Hardsigmoid, nn.Identity,
               nn.Dropout)


class Tape:
    """Forward in float64 with a record of each op's backward; :meth:`relevance` sweeps it in reverse."""

    def __init__(self, gate: str = "value", eps: float = EPS, stabilizer: float = EPS):
        self.gate_rule, self.eps, self.stabilizer = gate, eps, stabilizer
        self.steps: list[tuple[torch.Tensor, list[torch.Tensor], object]] = []

    def record(self, out: torch.Tensor, inputs: list[torch.Tensor], backward) -> torch.Tensor:
        """``backward(R_out) -> [R_in or None per input]``."""
        self.steps.append((out, inputs, backward))
        return out

    # ------------------------------------------------------------ ops

    def linear_map(self, x, fn, transposed):
        """``z = fn(x)`` (with bias); the epsilon rule ``R_x = x * W^T (R / stab(z))``, ``transposed(g) = W^T g``."""
        z = fn(x)
        return self.record(z, [x], lambda r: [x * transposed(r / stab(z, self.eps))])

    def conv(self, x, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None):
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if bn is not None:
            s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            w = w * s.reshape(-1, 1, 1, 1)
            b = (b - bn.running_mean.double()) * s + bn.bias.double()
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        z = F.conv2d(x, w, b, **kw)
        # W^T g as a transposed convolution (autograd's float64 depthwise backward is 100x slower), with the
        # output padding that restores the input size
        extra = [x.shape[2 + a] - ((z.shape[2 + a] - 1) * conv.stride[a] - 2 * conv.padding[a]
                                   + conv.dilation[a] * (w.shape[2 + a] - 1) + 1) for a in range(2)]
        return self.linear_map(x, lambda t: F.conv2d(t, w, b, **kw),
                               lambda g: F.conv_transpose2d(g, w, None, output_padding=extra, **kw))

    def dense(self, x, lin: nn.Linear):
        w = lin.weight.double()
        b = lin.bias.double() if lin.bias is not None else None
        return self.linear_map(x, lambda t: F.linear(t, w, b), lambda g: g @ w)

    def pass_through(self, x, fn):
        return self.record(fn(x), [x], lambda r: [r])

    def reindex(self, x, fn):
        """A re-indexing map (reshape, permute, slice): relevance goes back by its transpose."""
        return self.record(fn(x), [x], lambda r: [self.transpose_of(fn, x, r)])

    @staticmethod
    def transpose_of(fn, x, r):
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(xx), xx, r)
        return grad

    def mean_pool(self, x):
        """Global average pooling (keepdims), Zennit's Norm rule."""
        z = x.mean((2, 3), keepdim=True)
        return self.record(z, [x], lambda r: [x * (r / stab(z, self.stabilizer)) / (x.shape[2] * x.shape[3])])

    def max_pool(self, x, pool: nn.MaxPool2d):
        def fn(t):
            return F.max_pool2d(t, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        return self.record(fn(x), [x], lambda r: [self.transpose_of(fn, x, r)])

    def add(self, a, b):
        z = a + b
        return self.record(z, [a, b], lambda r: [a * r / stab(z, self.stabilizer), b * r / stab(z, self.stabilizer)])

    def gate(self, value, g):
        """``y = g * value``: the value rule or the uniform rule."""
        y = g * value
        if self.gate_rule == "value":
            return self.record(y, [value, g], lambda r: [unbroadcast(r, value.shape), None])
        return self.record(y, [value, g], lambda r: [unbroadcast(r / 2, value.shape), unbroadcast(r / 2, g.shape)])

    def layer_norm(self, x, norm: nn.LayerNorm):
        """LayerNorm over the last dims; the linearized epsilon rule."""
        axes = tuple(range(x.ndim - len(norm.normalized_shape), x.ndim))
        sigma = torch.sqrt(x.var(axes, unbiased=False, keepdim=True) + norm.eps)
        w = norm.weight.double() if norm.weight is not None else torch.ones(norm.normalized_shape, dtype=x.dtype)
        b = norm.bias.double() if norm.bias is not None else torch.zeros_like(w)
        y = w * (x - x.mean(axes, keepdim=True)) / sigma + b

        def backward(r):
            h = w * r / (sigma * stab(y, self.stabilizer))
            return [x * (h - h.mean(axes, keepdim=True))]
        return self.record(y, [x], backward)

    def chunk(self, x, n, dim):
        size = x.shape[dim] // n
        return [self.reindex(x, lambda t, i=i: t.narrow(dim, i * size, size)) for i in range(n)]

    def cat(self, parts, dim):
        y = torch.cat(parts, dim)
        bounds = torch.cumsum(torch.tensor([0] + [p.shape[dim] for p in parts]), 0).tolist()
        return self.record(y, parts, lambda r: [r.narrow(dim, bounds[i], bounds[i + 1] - bounds[i])
                                                for i in range(len(parts))])

    # ------------------------------------------------------------ the sweep

    def relevance(self, x: torch.Tensor, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The relevance of ``x`` for ``R = one_hot(target) * out``."""
        received = {id(out): torch.nn.functional.one_hot(target, out.shape[1]).to(out.dtype) * out}
        for y, inputs, backward in reversed(self.steps):
            r = received.pop(id(y), None)
            if r is None:
                continue
            for t, r_in in zip(inputs, backward(r), strict=True):
                if r_in is not None:
                    received[id(t)] = received[id(t)] + r_in if id(t) in received else r_in
        return received.get(id(x), torch.zeros_like(x))


# ---------------------------------------------------------------- modules


def run(tape: Tape, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in float64, op by op on ``tape``, for the module types of the test networks: torchvision's
    EfficientNet, MobileNetV3 and ConvNeXt blocks, the YOLO-like blocks of :mod:`gated_models`, and plain layers."""
    from vision_models import import_torchvision

    import_torchvision()
    from torchvision.models.convnext import CNBlock, LayerNorm2d
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.ops.misc import Permute, SqueezeExcitation
    from torchvision.ops.stochastic_depth import StochasticDepth

    if hasattr(module, "lrp_forward"):
        return module.lrp_forward(tape, x)
    if isinstance(module, nn.Sequential):
        children = list(module)
        i = 0
        while i < len(children):
            child = children[i]
            if isinstance(child, nn.Conv2d) and i + 1 < len(children) and isinstance(children[i + 1], nn.BatchNorm2d):
                x = tape.conv(x, child, children[i + 1])
                i += 2
                continue
            x = run(tape, child, x)
            i += 1
        return x
    if isinstance(module, nn.Conv2d):
        return tape.conv(x, module)
    if isinstance(module, nn.Linear):
        return tape.dense(x, module)
    if isinstance(module, ACTIVATIONS):
        return tape.pass_through(x, lambda t: module(t.clone()))  # torchvision builds in-place activations
    if isinstance(module, StochasticDepth):
        return x
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return tape.mean_pool(x)
    if isinstance(module, nn.MaxPool2d):
        return tape.max_pool(x, module)
    if isinstance(module, nn.Flatten):
        return tape.reindex(x, lambda t: t.flatten(1))
    if isinstance(module, Permute):
        return tape.reindex(x, lambda t: t.permute(*module.dims))
    if isinstance(module, LayerNorm2d):
        x = tape.reindex(x, lambda t: t.permute(0, 2, 3, 1))
        return tape.reindex(tape.layer_norm(x, module), lambda t: t.permute(0, 3, 1, 2))
    if isinstance(module, nn.LayerNorm):
        return tape.layer_norm(x, module)
    if isinstance(module, SqueezeExcitation):
        s = tape.mean_pool(x)
        s = run(tape, module.scale_activation, run(tape, module.fc2, run(tape, module.activation,
                                                                        run(tape, module.fc1, s))))
        return tape.gate(x, s)
    if isinstance(module, MBConv | InvertedResidual):
        out = run(tape, module.block, x)
        return tape.add(out, x) if module.use_res_connect else out
    if isinstance(module, CNBlock):
        out = run(tape, module.block, x)
        scale = module.layer_scale.double()
        return tape.add(tape.pass_through(out, lambda t: scale * t), x)
    raise TypeError(f"no reference for {type(module).__name__}")


def model_forward(tape: Tape, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole model: torchvision classifiers (features, avgpool, flatten, classifier) or a module with its own
    ``lrp_forward``."""
    if hasattr(model, "lrp_forward"):
        return model.lrp_forward(tape, x)
    h = tape.mean_pool(run(tape, model.features, x))
    if type(model).__name__ == "ConvNeXt":
        return run(tape, model.classifier, h)
    return run(tape, model.classifier, tape.reindex(h, lambda t: t.flatten(1)))


def reference_relevance(model: nn.Module, x, gate: str = "value", target=None, eps: float = EPS):
    """The float64 relevance of ``model`` at ``x`` (numpy in, numpy out) for the arg-max (or ``target``) class, with
    epsilon ``eps`` on the linear layers."""
    import copy

    import numpy as np

    model = copy.deepcopy(model).double().eval()
    tape = Tape(gate=gate, eps=eps)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    with torch.no_grad():
        out = model_forward(tape, model, xt)
    target = out.argmax(1) if target is None else torch.as_tensor(target)
    return tape.relevance(xt, out, target).detach().numpy(), out.detach().numpy()
