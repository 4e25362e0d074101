"""gru_digits: recurrent classifier (an LSTM, despite the historical name) that reads
the 8 rows of a scikit-learn 8x8 digit as 8 timesteps of 8 features; Linear head on
the last hidden state. Exported with the legacy torch.onnx exporter at opset 12
(an older-opset sample).

Run from the repo root:  python sample_models/scripts/make_gru_digits.py
"""

import common
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

NAME = "gru_digits"
OPSET = 12
HIDDEN = 64


class RowLSTM(nn.Module):
    def __init__(self, n_classes=10):
        super().__init__()
        self.rnn = nn.LSTM(input_size=8, hidden_size=HIDDEN, num_layers=1, batch_first=True)
        self.head = nn.Linear(HIDDEN, n_classes)

    def forward(self, x):  # x: [batch, 8 timesteps, 8 features]
        out, _ = self.rnn(x)
        return self.head(out[:, -1, :])


def main():
    common.seed_everything()
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # [N, 8, 8] in 0..1
    y = d.target.astype(np.int64)
    tr, te = common.split_indices(y, 0.25)

    model = RowLSTM()
    common.train_torch_classifier(
        model, torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), epochs=60, batch_size=64, lr=5e-3
    )
    with torch.no_grad():
        ref_acc = float((model(torch.from_numpy(x[te])).argmax(1).numpy() == y[te]).mean())

    onnx_model = common.export_torch(
        model,
        (torch.from_numpy(x[tr[:2]]),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset=OPSET,
        do_constant_folding=True,
    )
    calib = common.single_feeds({"input": x[tr]}, common.calib_indices(len(tr)))
    evals = common.batch_feeds({"input": x[te]}, y[te], 64)
    common.finalize(
        name=NAME,
        model=onnx_model,
        exporter=common.torch_exporter_name(),
        doc="LSTM over the rows of scikit-learn 8x8 digits (input [batch, 8 rows, 8 columns], "
        "scaled to 0..1). Built by onnxslim sample_models/scripts/make_gru_digits.py.",
        calib_feeds=calib,
        eval_feeds=evals,
        label_output="logits",
        label_output_kind="logits",
        notes=f"Despite the name this is an LSTM (hidden {HIDDEN}, one layer, batch_first) "
        "exported as an ONNX LSTM op (opset 12) with Transpose/Squeeze/Gather glue; head is a "
        "Gemm on the last timestep. No initial state inputs (zeros). Data: sklearn "
        "load_digits, pixels/16, rows as timesteps, stratified 75/25 split (seed 0).",
        min_accuracy=0.90,
        reference_accuracy=ref_acc,
    )


if __name__ == "__main__":
    main()
