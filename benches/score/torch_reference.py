"""PyTorch eager reference for benches/score_speed.sh: scores GRAM pairs the way GRAM's own
evaluation does. Pairs are taken in file order, `--batch-pairs` at a time; each order (A = a,
B = b and A = b, B = a) is its own left-padded sequence; the model (transformers'
LlamaForCausalLM, eager attention, f32) runs the whole batch and the A/B logits are read at the
last position; score(a) = (P_A(ab) + P_B(ba)) / 2. The token ids are the ones `gram-data build`
wrote (stage-2 rows, both orders), so both sides see the same sequences.

Prints one JSON line: pairs, seconds (scoring only, model loading excluded), pairs_per_s,
scores (to compare with gram-score's), and the work done (padded positions, attention cells: rows
x width x width, the whole score matrix eager attention computes) for the benchmark's FLOP rate."""

import argparse
import json
import time

import pyarrow.parquet as pq
import torch
from transformers import LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF folder, or a folder holding --gguf")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--data", required=True, help="stage-2 Parquet rows, both orders of each pair")
    ap.add_argument("--pairs", type=int, required=True)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--label-ids", required=True, help="A,B")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    la, lb = (int(x) for x in a.label_ids.split(","))
    kw = {"gguf_file": a.gguf} if a.gguf else {}
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="eager", **kw).eval()
    t = pq.read_table(a.data, columns=["pair_id", "swapped", "input_ids"]).to_pylist()
    pairs = {}
    order = []
    for r in t:
        if r["pair_id"] not in pairs:
            pairs[r["pair_id"]] = {}
            order.append(r["pair_id"])
        pairs[r["pair_id"]]["ba" if r["swapped"] else "ab"] = r["input_ids"]
    order = [p for p in order if len(pairs[p]) == 2][: a.pairs]
    scores = []
    padded = cells = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(order), a.batch_pairs):
            seqs = []
            for p in order[i : i + a.batch_pairs]:
                seqs += [pairs[p]["ab"], pairs[p]["ba"]]
            w = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), w), dtype=torch.long)
            mask = torch.zeros((len(seqs), w), dtype=torch.long)
            for k, s in enumerate(seqs):
                ids[k, w - len(s) :] = torch.tensor(s)
                mask[k, w - len(s) :] = 1
            padded += len(seqs) * w
            cells += len(seqs) * w * w
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]
            p_a = torch.softmax(logits[:, [la, lb]], dim=-1)[:, 0]
            for k in range(0, len(seqs), 2):
                scores.append(0.5 * (p_a[k].item() + (1.0 - p_a[k + 1].item())))
    secs = time.perf_counter() - t0
    print(json.dumps({"pairs": len(order), "seconds": secs, "pairs_per_s": len(order) / secs,
                      "work": {"padded_tokens": padded, "attention_cells": cells}, "scores": scores}))


if __name__ == "__main__":
    main()
