"""transformer_text: tiny BERT-style transformer encoder classifier over a
synthetic 4-topic text corpus generated in this script (no downloads).

token embedding + learned position embedding, 2 post-LN encoder layers
(multi-head self-attention with an additive attention-mask bias, LayerNorm,
GELU MLP), masked mean pool, Linear head. Exported with the legacy torch.onnx
exporter at opset 17; inputs input_ids / attention_mask int64 [batch, seq].

Run from the repo root:  python sample_models/scripts/make_transformer_text.py
"""

import json
import math

import common
import numpy as np
import torch
from torch import nn

NAME = "transformer_text"
OPSET = 17
MAX_LEN = 32
D_MODEL = 48
N_HEADS = 4
D_FF = 96
N_LAYERS = 2
PAD, UNK = 0, 1
TOPICS = ["sports", "cooking", "technology", "weather"]

# --------------------------------------------------------------------------- #
# corpus
# --------------------------------------------------------------------------- #
LEX = {
    "sports": {
        "subj": [
            "the team",
            "our striker",
            "the coach",
            "the goalkeeper",
            "the home side",
            "the visitors",
            "the captain",
            "the young runner",
            "the referee",
            "the league leaders",
        ],
        "verb": [
            "scored",
            "defended",
            "won",
            "lost",
            "tied",
            "trained for",
            "celebrated",
            "missed",
            "played",
            "dominated",
        ],
        "obj": [
            "the match",
            "a late goal",
            "the final",
            "the penalty",
            "the championship",
            "the second half",
            "the derby",
            "the season opener",
            "the relay",
            "the tournament",
        ],
        "adj": ["tough", "thrilling", "fast", "physical", "decisive", "close", "stunning"],
        "place": ["at the stadium", "on the pitch", "in the arena", "on the track", "at the field"],
    },
    "cooking": {
        "subj": [
            "the chef",
            "my grandmother",
            "the baker",
            "the cook",
            "our kitchen staff",
            "the pastry chef",
            "the host",
            "my roommate",
            "the waiter",
            "the caterer",
        ],
        "verb": [
            "baked",
            "roasted",
            "seasoned",
            "simmered",
            "chopped",
            "tasted",
            "grilled",
            "stirred",
            "served",
            "burned",
        ],
        "obj": [
            "the bread",
            "a spicy soup",
            "the garlic",
            "fresh pasta",
            "the sauce",
            "a lemon cake",
            "the onions",
            "the roast chicken",
            "a bowl of rice",
            "the dumplings",
        ],
        "adj": ["delicious", "salty", "crispy", "tender", "sweet", "hot", "creamy"],
        "place": ["in the oven", "in the kitchen", "on the stove", "at the bakery", "in a pan"],
    },
    "technology": {
        "subj": [
            "the developer",
            "the startup",
            "our server",
            "the new laptop",
            "the engineer",
            "the app",
            "the network admin",
            "the chip maker",
            "the robot",
            "the database",
        ],
        "verb": [
            "crashed",
            "updated",
            "compiled",
            "deployed",
            "installed",
            "rebooted",
            "encrypted",
            "downloaded",
            "debugged",
            "released",
        ],
        "obj": [
            "the software",
            "a security patch",
            "the firmware",
            "the source code",
            "the update",
            "a new processor",
            "the cloud service",
            "the driver",
            "the kernel",
            "the website",
        ],
        "adj": ["fast", "buggy", "secure", "wireless", "digital", "open source", "slow"],
        "place": ["in the data center", "on the server", "in the lab", "on the phone", "online"],
    },
    "weather": {
        "subj": [
            "the storm",
            "a cold front",
            "the wind",
            "heavy rain",
            "the forecast",
            "the snow",
            "a heat wave",
            "thick fog",
            "the thunder",
            "the hurricane",
        ],
        "verb": [
            "hit",
            "flooded",
            "swept across",
            "covered",
            "cooled",
            "soaked",
            "battered",
            "warmed",
            "moved over",
            "cleared from",
        ],
        "obj": [
            "the coast",
            "the valley",
            "the northern region",
            "the city",
            "the mountains",
            "the islands",
            "the farmland",
            "the highway",
            "the river basin",
            "the airport",
        ],
        "adj": ["humid", "freezing", "windy", "cloudy", "hot", "stormy", "mild"],
        "place": ["overnight", "this morning", "in the afternoon", "near the coast", "across the plains"],
    },
}
SHARED_TIME = [
    "today",
    "yesterday",
    "last night",
    "on monday",
    "this weekend",
    "again",
    "once more",
    "earlier",
    "late",
    "finally",
]
FILLER = [
    "really",
    "very",
    "quite",
    "honestly",
    "apparently",
    "i think",
    "people said",
    "news says",
    "somehow",
    "as usual",
    "by the way",
    "of course",
]
TEMPLATES = [
    "{subj} {verb} {obj} {place}",
    "{subj} {verb} {obj} {time}",
    "{time} {subj} {verb} {obj}",
    "{subj} {verb} {obj} and it was {adj}",
    "it was a {adj} day {place} when {subj} {verb} {obj}",
    "{filler} {subj} {verb} {obj}",
    "{subj} {filler} {verb} {obj} {place} {time}",
    "everyone agreed that {obj} was {adj}",
    "{subj} was {adj} {time}",
    "{obj} {place} looked {adj} {time}",
]


def make_sentence(rng: np.random.Generator, topic: str) -> str:
    lx = LEX[topic]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    t = pick(TEMPLATES)
    s = t.format(
        subj=pick(lx["subj"]),
        verb=pick(lx["verb"]),
        obj=pick(lx["obj"]),
        adj=pick(lx["adj"]),
        place=pick(lx["place"]),
        time=pick(SHARED_TIME),
        filler=pick(FILLER),
    )
    words = s.split()
    # noise: 0-2 distractor words taken from another topic's lexicon
    n_noise = int(rng.choice([0, 0, 1, 1, 2]))
    for _ in range(n_noise):
        other = LEX[pick([t2 for t2 in TOPICS if t2 != topic])]
        w = pick(pick([other["subj"], other["obj"], other["adj"], other["verb"]])).split()[-1]
        words.insert(int(rng.integers(len(words) + 1)), w)
    # occasional extra filler words, and occasional word dropout
    if rng.random() < 0.3:
        words.insert(int(rng.integers(len(words) + 1)), pick(FILLER).split()[0])
    if len(words) > 4 and rng.random() < 0.3:
        del words[int(rng.integers(len(words)))]
    return " ".join(words[:MAX_LEN])


def make_corpus(rng, n: int = 1600):
    labels = rng.integers(len(TOPICS), size=n)
    return [make_sentence(rng, TOPICS[int(l)]) for l in labels], labels.astype(np.int64)


def build_vocab(sentences):
    words = sorted({w for s in sentences for w in s.split()})
    return {"[PAD]": PAD, "[UNK]": UNK, **{w: i + 2 for i, w in enumerate(words)}}


def encode(sentences, vocab, pad_to=None):
    ids = [[vocab.get(w, UNK) for w in s.split()] for s in sentences]
    L = pad_to or max(len(x) for x in ids)
    out = np.zeros((len(ids), L), np.int64)
    mask = np.zeros((len(ids), L), np.int64)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return out, mask


# --------------------------------------------------------------------------- #
# model
# --------------------------------------------------------------------------- #
class SelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x, mask_bias):
        b, s = x.shape[0], x.shape[1]

        def heads(t):
            return t.reshape(b, s, self.h, self.dh).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + mask_bias
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.h * self.dh)
        return self.o(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, d, h, ff, p=0.1):
        super().__init__()
        self.attn = SelfAttention(d, h)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(p)

    def forward(self, x, mask_bias):
        x = self.ln1(x + self.drop(self.attn(x, mask_bias)))
        return self.ln2(x + self.drop(self.ff(x)))


class TextClassifier(nn.Module):
    def __init__(self, vocab_size, n_classes):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, D_MODEL, padding_idx=PAD)
        self.pos = nn.Embedding(MAX_LEN, D_MODEL)
        self.ln0 = nn.LayerNorm(D_MODEL)
        self.layers = nn.ModuleList(EncoderLayer(D_MODEL, N_HEADS, D_FF) for _ in range(N_LAYERS))
        self.head = nn.Linear(D_MODEL, n_classes)

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.ln0(self.tok(input_ids) + self.pos(pos)[None])
        m = attention_mask.to(x.dtype)
        mask_bias = (1.0 - m[:, None, None, :]) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        mw = m[:, :, None]
        pooled = (x * mw).sum(1) / mw.sum(1).clamp(min=1.0)
        return self.head(pooled)


def main():
    rng = common.seed_everything()
    sentences, labels = make_corpus(rng)
    tr, te = common.split_indices(labels, 0.2)
    tr_s = [sentences[i] for i in tr]
    te_s = [sentences[i] for i in te]
    vocab = build_vocab(tr_s)
    print(f"corpus: {len(sentences)} sentences, vocab {len(vocab)}; e.g. {tr_s[:3]}")

    ids, mask = encode(tr_s, vocab, MAX_LEN)
    model = TextClassifier(len(vocab), len(TOPICS))
    common.train_torch_classifier(
        model,
        torch.from_numpy(ids),
        torch.from_numpy(labels[tr]),
        epochs=25,
        batch_size=32,
        lr=2e-3,
        weight_decay=1e-4,
        extra_inputs=[torch.from_numpy(mask)],
        log_every=5,
    )

    # eval: sort by length, batches of 64, each padded to its own max length
    te_ids = [[vocab.get(w, UNK) for w in s.split()] for s in te_s]
    order = sorted(range(len(te_s)), key=lambda i: (len(te_ids[i]), i))
    evals, correct = [], 0
    for s in range(0, len(order), 64):
        idx = order[s : s + 64]
        e_ids, e_mask = encode([te_s[i] for i in idx], vocab)
        y = labels[te][idx]
        with torch.no_grad():
            correct += int((model(torch.from_numpy(e_ids), torch.from_numpy(e_mask)).argmax(1).numpy() == y).sum())
        evals.append({"input_ids": e_ids, "attention_mask": e_mask, common.LABEL_KEY: y.astype(np.int64)})
    ref_acc = correct / len(te_s)

    # calib: one training sentence per file, padded up to a multiple of 8 (mask 0 on padding)
    calib = []
    for i in common.calib_indices(len(tr)):
        n = len(tr_s[i].split())
        c_ids, c_mask = encode([tr_s[i]], vocab, pad_to=min(MAX_LEN, 8 * math.ceil(n / 8)))
        calib.append({"input_ids": c_ids, "attention_mask": c_mask})

    ex_ids, ex_mask = encode(tr_s[:2], vocab, 12)
    onnx_model = common.export_torch(
        model,
        (torch.from_numpy(ex_ids), torch.from_numpy(ex_mask)),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch"},
        },
        opset=OPSET,
        do_constant_folding=True,
    )
    entry = common.finalize(
        name=NAME,
        model=onnx_model,
        exporter=common.torch_exporter_name(),
        doc="Tiny BERT-style transformer encoder topic classifier (sports, cooking, technology, "
        "weather) over a synthetic corpus. Built by onnxslim "
        "sample_models/scripts/make_transformer_text.py.",
        calib_feeds=calib,
        eval_feeds=evals,
        label_output="logits",
        label_output_kind="logits",
        notes=f"Labels 0..3 = {TOPICS}. d_model={D_MODEL}, heads={N_HEADS}, ff={D_FF}, "
        f"layers={N_LAYERS}, max positions={MAX_LEN} (seq must be <= {MAX_LEN}), word vocabulary of {len(vocab)} "
        "(0=[PAD], 1=[UNK]) built from the training split. Post-LN layers: separate Q/K/V "
        "Linear -> MatMul; additive mask bias (1-mask)*-10000; Softmax; exact GELU (Erf "
        "pattern at opset 17); LayerNormalization; masked mean pool; Gemm head. Eval files are "
        "length-sorted batches each padded to its own max length (files differ in seq); calib "
        "files are single sentences padded to a multiple of 8 with attention_mask 0 on padding. "
        "Corpus: 1600 template sentences with 0-2 distractor words from other topics, seed 0, "
        "stratified 80/20 split.",
        min_accuracy=0.85,
        reference_accuracy=ref_acc,
    )
    # word -> id table, so callers can tokenize new text (lowercase, split on spaces)
    vocab_path = common.SAMPLE_DIR / NAME / "vocab.json"
    vocab_path.write_text(json.dumps({"labels": TOPICS, "max_len": MAX_LEN, "vocab": vocab}, indent=0) + "\n")
    print(f"[{NAME}] wrote {vocab_path} ({len(vocab)} words); model {entry['size_bytes']} bytes")


if __name__ == "__main__":
    main()
