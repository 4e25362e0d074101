"""Export common architecture shapes (random weights, BatchNorm statistics set) with torch.onnx at opsets 11/13/17.

Robustness fixtures for the int8 quantizer, not trained models: MobileNet-style inverted residuals (depthwise
convs, ReLU6 -> Clip), a ResNet-style stack (7x7 stem, MaxPool, downsample shortcuts), a tiny single-shot
detector whose ONE output holds box pixels (0..320) next to class scores (0..1), an embedding + Conv1d +
bidirectional GRU, and a ViT-style encoder (patch Conv, LayerNorm, attention MatMuls, GELU).

Needs torch (the sample-model build venv):  python bench/arch_sweep/make_models.py bench/out/arch_sweep/models
"""

import os
import sys

import torch
import torch.nn as nn

torch.manual_seed(0)
OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)


def bn_init(m):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)


class InvRes(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvRes(16, 16, 1, 1), InvRes(16, 24, 2, 4), InvRes(24, 24, 1, 4), InvRes(24, 32, 2, 4), InvRes(32, 32, 1, 4)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 100))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        self.layers = nn.Sequential(Basic(32, 32, 1), Basic(32, 64, 2), Basic(64, 64, 1), Basic(64, 128, 2))
        self.fc = nn.Linear(128, 100)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class Detectorish(nn.Module):
    """A tiny single-shot detector: per-anchor boxes (pixels) and class scores concatenated in ONE output."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1),
            nn.ReLU(),
        )
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        f = self.up(self.backbone(x))
        boxes = torch.sigmoid(self.box(f)) * 320.0  # pixel coordinates
        scores = torch.sigmoid(self.cls(f))
        out = torch.cat([boxes, scores], 1)  # [B, 9, H, W]: coordinates 0..320 next to scores 0..1
        return out.flatten(2).transpose(1, 2)


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(500, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.gru = nn.GRU(32, 48, batch_first=True, bidirectional=True)
        self.out = nn.Linear(96, 7)

    def forward(self, ids):
        x = self.emb(ids)
        x = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        y, _ = self.gru(x)
        return self.out(y.mean(1))


class Block(nn.Module):
    def __init__(self, d=64, h=4):
        super().__init__()
        self.h = h
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.n2(x))


class ViTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 64, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, 64) * 0.02)
        self.enc = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.enc(t)).mean(1))


MODELS = {
    "mobilenetish": (MobileNetish, lambda: torch.randn(1, 3, 64, 64), {"x": {0: "batch"}}),
    "resnetish": (ResNetish, lambda: torch.randn(1, 3, 64, 64), {"x": {0: "batch"}}),
    "detectorish": (Detectorish, lambda: torch.randn(1, 3, 64, 64), {"x": {0: "batch"}}),
    "seq_gru": (Seq, lambda: torch.randint(0, 500, (1, 12)), {"x": {0: "batch", 1: "seq"}}),
    "vitish": (ViTish, lambda: torch.randn(1, 3, 32, 32), {"x": {0: "batch"}}),
}

for name, (cls, make, dyn) in MODELS.items():
    m = cls().eval()
    bn_init(m)
    for opset in (11, 13, 17):
        if name == "vitish" and opset < 14:
            continue
        path = os.path.join(OUT, f"{name}_op{opset}.onnx")
        with torch.no_grad():
            torch.onnx.export(
                m,
                (make(),),
                path,
                input_names=["x"],
                output_names=["y"],
                opset_version=opset,
                dynamic_axes={**dyn, "y": {0: "batch"}},
                dynamo=False,
            )
        print("wrote", path)
