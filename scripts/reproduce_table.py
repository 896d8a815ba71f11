"""The results table of scripts/reproduce.sh (markdown on stdout, results.json beside it):
test accuracy of each model overall, per source and per LLMBar subset, with 95% bootstrap
intervals, each judge's single-order accuracy (each order of a pair judged on its own: below the
both-order accuracy when the judge leans on the position), and the time each row took (its
training runs and its evaluation)."""

import json
import sys

out, lr, epochs, pairs, backend = sys.argv[1:6]
times = {}
for line in open(f"{out}/times.tsv"):
    name, secs = line.rstrip("\n").split("\t")
    times[name] = int(secs)
rows = [
    ("a", "(a) zero-shot judge", ["(a) eval"]),
    ("b", "(b) stage 2 only", ["(b) stage 2", "(b) eval"]),
    ("c", "(c) GRAM: stage 1 + stage 2", ["(c) stage 1", "(c) stage 2", "(c) eval"]),
    ("d", "(d) Bradley-Terry", ["(d) bt", "(d) eval"]),
]
evals = {k: json.load(open(f"{out}/eval-{k}.json")) for k, _, _ in rows}


def cell(g):
    if not g or not g.get("pairs"):
        return "-"
    lo, hi = g.get("ci95") or (g["accuracy"], g["accuracy"])
    return f"{100 * g['accuracy']:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"


sources = sorted({s for e in evals.values() for s in e["by_source"]})
subsets = sorted({s for e in evals.values() for s in e["by_subset"]})
head = ["model", "overall"] + sources + ["single order", "time"]
print(f"Test accuracy, % (95% bootstrap interval); {pairs} labeled train pairs, {epochs} epoch(s), "
      f"lr {lr} (chosen on valid), backend {backend}; n = {evals['a']['overall']['pairs']} test pairs.\n")
print("| " + " | ".join(head) + " |")
print("|" + " --- |" * len(head))
for k, name, parts in rows:
    e = evals[k]
    secs = sum(times.get(p, 0) for p in parts)
    line = [name, cell(e["overall"])] + [cell(e["by_source"].get(s)) for s in sources]
    single = e["overall"].get("single_order_accuracy")
    line.append("-" if single is None else f"{100 * single:.1f}")
    line.append(f"{secs // 60} min {secs % 60} s")
    print("| " + " | ".join(line) + " |")
if subsets:
    print("\nLLMBar subsets (and other sources' subsets):\n")
    print("| subset | " + " | ".join(f"({k})" for k, _, _ in rows) + " |")
    print("|" + " --- |" * (len(rows) + 1))
    for s in subsets:
        print(f"| {s} | " + " | ".join(cell(evals[k]["by_subset"].get(s)) for k, _, _ in rows) + " |")
total = sum(times.values())
data = f"data {times['data']} s" if "data" in times else "data built beforehand (REPRO_DATA)"
print(f"\nWhole script: {total // 3600} h {total % 3600 // 60} min ({data}, "
      f"learning-rate pilots {sum(v for k, v in times.items() if k.startswith('pilot'))} s).")
json.dump({"lr": lr, "epochs": int(epochs), "pairs": int(pairs), "backend": backend, "times_s": times,
           "eval": evals}, open(f"{out}/results.json", "w"), indent=1)
