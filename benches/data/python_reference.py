"""The same work as `gram-data build` done the Python way: HF `datasets` + `.map(batched=True)` with
HF `tokenizers`: the GRAM judge prompt in both orders through the chat template, tokenised, and
the stage-1 pair text tokenised; written to Parquet. Prints rows/s, tokens/s and peak RSS.

    python python_reference.py IN.jsonl TOKENIZER_DIR OUT_DIR
"""
import json, os, resource, sys, time

import datasets
from tokenizers import Tokenizer

JUDGE = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
         "assistants to the user question displayed below. You should choose the assistant that follows "
         "the user's instructions and answers the user's question better. Your evaluation should consider "
         "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of "
         "their responses. Avoid any position biases and ensure that the order in which the responses were "
         "presented does not influence your decision. Do not allow the length of the responses to influence "
         "your evaluation. Do not favor certain names of the assistants. Be as objective as possible. "
         "Please directly output your final verdict by strictly following this format: \"A\" if assistant A "
         "is better, \"B\" if assistant B is better.")
PAIR = ("[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(user):
    return SYSTEM + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


def main():
    src, tok_dir, out = sys.argv[1:4]
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    # No caches: datasets would otherwise reuse the Arrow file and the map result of an earlier run.
    datasets.disable_caching()
    t0 = time.time()
    ds = datasets.load_dataset("json", data_files=src, split="train", download_mode="force_redownload")

    def fn(batch):
        s1, s2, labels = [], [], []
        for x, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            s1.append(chat(f"[User Question]\n{x}") + PAIR.format(a=c, b=r) + "<|im_end|>\n")
            for a, b, l in ((c, r, "A"), (r, c, "B")):
                s2.append(chat(f"{JUDGE}\n\n[User Question]\n{x}\n\n" + PAIR.format(a=a, b=b) + "\n\n#Preferred:"))
                labels.append(l)
        e1 = tok.encode_batch(s1, add_special_tokens=False)
        e2 = tok.encode_batch(s2, add_special_tokens=False)
        return {"stage1_ids": [e.ids for e in e1], "stage2_ids": [[e.ids for e in e2[2 * i:2 * i + 2]] for i in range(len(e1))],
                "labels": [labels[2 * i:2 * i + 2] for i in range(len(e1))]}

    ds = ds.map(fn, batched=True, batch_size=4096, remove_columns=ds.column_names, num_proc=1,
                load_from_cache_file=False)
    tokens = sum(len(x) for x in ds["stage1_ids"]) + sum(len(y) for x in ds["stage2_ids"] for y in x)
    os.makedirs(out, exist_ok=True)
    ds.to_parquet(os.path.join(out, "python.parquet"))
    secs = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rows": len(ds), "seconds": secs, "rows_per_s": len(ds) / secs, "tokens": tokens,
                      "tokens_per_s": tokens / secs, "peak_rss_bytes": rss}))


if __name__ == "__main__":
    main()
