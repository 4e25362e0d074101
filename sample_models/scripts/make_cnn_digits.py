"""cnn_digits: small residual CNN (Conv+BN+ReLU, 2 residual blocks, GAP, Linear)
trained on scikit-learn's 8x8 digits; exported with the legacy torch.onnx exporter
(opset 17, do_constant_folding=False so BatchNormalization nodes stay in the graph).

Run from the repo root:  python sample_models/scripts/make_cnn_digits.py
"""

import common
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

NAME = "cnn_digits"
OPSET = 17


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, stride=1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=False),
        )


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)  # residual Add


class DigitsCNN(nn.Module):
    def __init__(self, n_classes=10):
        super().__init__()
        self.stem = ConvBNReLU(1, 16)
        self.block1 = ResBlock(16, 16)
        self.block2 = ResBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, n_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.head(x)


def main():
    common.seed_everything()
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # [N,1,8,8] in 0..1
    y = d.target.astype(np.int64)
    tr, te = common.split_indices(y, 0.25)

    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    model = DigitsCNN()
    common.train_torch_classifier(model, xt, yt, epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-4)
    with torch.no_grad():
        ref_acc = float((model(torch.from_numpy(x[te])).argmax(1).numpy() == y[te]).mean())

    onnx_model = common.export_torch(
        model,
        (torch.from_numpy(x[tr[:2]]),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset=OPSET,
        do_constant_folding=False,
    )

    calib = common.single_feeds({"input": x[tr]}, common.calib_indices(len(tr)))
    evals = common.batch_feeds({"input": x[te]}, y[te], 64)
    common.finalize(
        name=NAME,
        model=onnx_model,
        exporter=common.torch_exporter_name(),
        doc="Residual CNN classifier for scikit-learn 8x8 digits (input scaled to 0..1). "
        "Built by onnxslim sample_models/scripts/make_cnn_digits.py.",
        calib_feeds=calib,
        eval_feeds=evals,
        label_output="logits",
        label_output_kind="logits",
        notes="Conv(bias=False)+BatchNormalization+Relu stem, two residual blocks (the second "
        "with stride 2 and a 1x1 Conv+BN shortcut), GlobalAveragePool, Flatten, Gemm. "
        "Exported in eval mode with do_constant_folding=False: BatchNormalization nodes are "
        "NOT folded (fusion work for an optimizer). The one Identity node is the exporter "
        "de-duplicating two bit-identical BN bias initializers (block2.bn2 and the shortcut BN "
        "receive identical gradients because their outputs are summed). Data: sklearn load_digits, pixels/16, stratified 75/25 split "  # noqa: E501
        "(seed 0).",
        min_accuracy=0.95,
        reference_accuracy=ref_acc,
    )


if __name__ == "__main__":
    main()
