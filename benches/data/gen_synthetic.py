"""Writes N synthetic {prompt, chosen, rejected} rows as JSONL (seeded), for the gram-data benchmark.

    python gen_synthetic.py OUT.jsonl N [--seed 0]
"""
import argparse, json, random

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time has look "
         "two more write go see number no way could people my than first water been call who oil its now find").split()


def sentence(r, lo, hi):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi))).capitalize() + "."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    r = random.Random(a.seed)
    with open(a.out, "w") as f:
        for i in range(a.n):
            row = {"prompt": f"Q{i}: " + sentence(r, 8, 30),
                   "chosen": " ".join(sentence(r, 5, 25) for _ in range(r.randint(1, 5))),
                   "rejected": " ".join(sentence(r, 5, 25) for _ in range(r.randint(1, 5)))}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
