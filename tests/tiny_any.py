"""Tiny models with the export patterns of real models from other exporters (torch export in the test).

* :func:`same_pad_cnn` — TensorFlow-style "same" padding computed at run time: every Conv is preceded by
  a ``Pad`` whose pads come from ``Shape``/``ConstantOfShape``/``Concat``/``Reshape``/``Slice``/... (timm's
  ``Conv2dSame``, EfficientNet ports), exported with a dynamic batch or fully static.
* :func:`nhwc_two_class` — a tf2onnx-style two-class classifier: NHWC input, a ``Transpose``, residual
  bottlenecks, ``ReduceMean`` pooling, a ``MatMul + Add`` head and a ``Softmax``.
* :func:`dense_cnn` — a fully convolutional CNN with a dense output map and dynamic height and width.
* :func:`two_map_cnn` — an MTCNN P-Net-style fully convolutional net: PReLU, two dense outputs (a
  channel ``Softmax`` face map and a plain box map), dynamic batch, height and width.
* :func:`two_head_net` — an MTCNN R-Net-style classifier: PReLU hosts, a hidden dense layer read by a
  face classifier (``Softmax``) and a box regressor beside it.
* :func:`sequence_recogniser` — a CTC-style text recogniser (PaddleOCR/CRNN pattern): the feature map is
  pooled over the height (``ReduceMean``), a ``Transpose`` makes ``[N, T, C]`` steps, and a ``MatMul + Add`` head
  scores every step, ``[N, T, K]`` with a ``Softmax``; dynamic batch and width (T follows the width).
"""

from __future__ import annotations

import io
import math

import onnx


def _export(module, example, dynamic_axes: dict | None, opset: int = 17,
            outputs: tuple[str, ...] = ("output",)) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, example, buf, input_names=["input"], output_names=list(outputs),
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def _same_pad_module(classes: int, width: int):
    import torch.nn.functional as F
    from torch import nn

    class Conv2dSame(nn.Conv2d):
        """TensorFlow "same" padding, computed from the input size at run time (as timm does)."""

        def forward(self, x):
            ih, iw = x.size()[-2:]
            kh, kw = self.weight.size()[-2:]
            sh, sw = self.stride
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = Conv2dSame(3, 16, 3, stride=2)
            self.c2 = Conv2dSame(16, width, 3, stride=2)
            self.c3 = Conv2dSame(width, width, 1)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            x = F.relu6(self.c1(x))
            x = F.relu6(self.c2(x))
            x = F.relu6(self.c3(x))
            return self.fc(x.mean((2, 3)))

    return Net()


def same_pad_cnn(seed: int = 0, size: int = 32, classes: int = 10, dynamic_batch: bool = True,
                 width: int = 32) -> onnx.ModelProto:
    import torch

    torch.manual_seed(seed)
    net = _same_pad_module(classes, width)
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    return _export(net, torch.rand(1, 3, size, size), axes)


def nhwc_two_class(seed: int = 0, size: int = 32, classes: int = 2) -> onnx.ModelProto:
    """NHWC float input → Transpose → conv stem → two residual bottlenecks → ReduceMean → MatMul+Add → Softmax."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Bottleneck(nn.Module):
        def __init__(self, c: int, mid: int) -> None:
            super().__init__()
            self.a = nn.Conv2d(c, mid, 1)
            self.b = nn.Conv2d(mid, mid, 3, padding=1)
            self.c = nn.Conv2d(mid, c, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = torch.relu(self.b(y))
            return torch.relu(x + self.c(y))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
            self.b1 = Bottleneck(32, 16)
            self.b2 = Bottleneck(32, 16)
            self.head = nn.Parameter(torch.randn(32, classes) * 0.3)
            self.bias = nn.Parameter(torch.randn(classes) * 0.1)

        def forward(self, x):
            x = x.permute(0, 3, 1, 2)
            x = torch.relu(self.stem(x))
            x = self.b2(self.b1(x))
            x = x.mean((2, 3))
            return torch.softmax(x @ self.head + self.bias, dim=-1)

    return _export(Net(), torch.rand(1, size, size, 3), {"input": {0: "batch"}, "output": {0: "batch"}})


def dense_cnn(seed: int = 0, size: tuple[int, int] = (48, 64)) -> onnx.ModelProto:
    """A fully convolutional text/segmentation-style CNN: dynamic H and W, a sigmoid map at 1/4 scale."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 1, 1), nn.Sigmoid(),
    )
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch", 2: "h4", 3: "w4"}}
    return _export(net, torch.rand(1, 3, *size), axes)


def narrow_tail_decoder(seed: int = 0, size: tuple[int, int] = (48, 64)) -> onnx.ModelProto:
    """A CRAFT-like fully convolutional map: a wide backbone, then a narrow 1×1 layer (m = 8 inputs per
    neuron too few to host; 16 just enough) right before the output map."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 2, 1),
    )
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch", 2: "h4", 3: "w4"}}
    return _export(net, torch.rand(1, 3, *size), axes)


def nhwc_tail_classifier(seed: int = 0, size: int = 32, classes: int = 10, width: int = 48) -> onnx.ModelProto:
    """A tf2onnx-style NHWC tail: ``… → Relu → Transpose(0,2,3,1) → ReduceMean(axes 1,2) → MatMul+Add``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.mid = nn.Conv2d(16, width, 3, stride=2, padding=1)
            self.head = nn.Parameter(torch.randn(width, classes) * 0.3)
            self.bias = nn.Parameter(torch.randn(classes) * 0.1)

        def forward(self, x):
            x = torch.relu(self.stem(x.permute(0, 3, 1, 2)))
            x = torch.relu(self.mid(x)).permute(0, 2, 3, 1)
            return x.mean((1, 2)) @ self.head + self.bias

    return _export(Net(), torch.rand(1, size, size, 3), {"input": {0: "batch"}, "output": {0: "batch"}})


def sequence_recogniser(seed: int = 0, size: tuple[int, int] = (32, 96), classes: int = 40,
                        width: int = 48) -> onnx.ModelProto:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.c2 = nn.Conv2d(16, width, 3, stride=2, padding=1)
            self.c3 = nn.Conv2d(width, width, 1)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.relu(self.c2(x))
            x = torch.relu(self.c3(x))
            x = x.mean(2).transpose(1, 2)  # pooled over the height: [N, T, C] steps along the width
            return torch.softmax(self.fc(x), dim=-1)

    axes = {"input": {0: "batch", 3: "width"}, "output": {0: "batch", 1: "steps"}}
    return _export(Net(), torch.rand(1, 3, *size), axes)


def two_map_cnn(seed: int = 0, size: tuple[int, int] = (48, 64)) -> onnx.ModelProto:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.PReLU(16),
                                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.PReLU(32),
                                          nn.Conv2d(32, 32, 3, padding=1), nn.PReLU(32))
            self.prob = nn.Conv2d(32, 2, 1)
            self.box = nn.Conv2d(32, 4, 1)

        def forward(self, x):
            f = self.features(x)
            return torch.softmax(self.prob(f), dim=1), self.box(f)

    dyn = {0: "batch", 2: "h4", 3: "w4"}
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "prob": dyn, "box": dyn}
    return _export(Net(), torch.rand(1, 3, *size), axes, outputs=("prob", "box"))


def two_head_net(seed: int = 0, size: int = 24, per_channel: bool = True) -> onnx.ModelProto:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.PReLU(16),
                                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.PReLU(32))
            self.hidden = nn.Linear(32 * (size // 4) ** 2, 64)
            self.act = nn.PReLU(64 if per_channel else 1)
            self.cls = nn.Linear(64, 2)
            self.box = nn.Linear(64, 4)

        def forward(self, x):
            h = self.act(self.hidden(self.features(x).flatten(1)))
            return torch.softmax(self.cls(h), dim=1), self.box(h)

    axes = {"input": {0: "batch"}, "prob": {0: "batch"}, "box": {0: "batch"}}
    return _export(Net(), torch.rand(1, 3, size, size), axes, outputs=("prob", "box"))
