"""Concurrent OpenRLHF-shaped clients against `gram-score serve`.

Each client sends POST /get_reward requests of --items items ({"query": prompt + response,
"prompts", "labels": reference}) until the pairs of its share are sent; prints one JSON line
with pairs/s, p50/p99 latency, errors, and the rewards by pair index.
"""
import argparse, json, statistics, threading, time, urllib.error, urllib.request

import pyarrow.parquet as pq


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pairs", required=True, help="Parquet with prompt, response, reference")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--items", type=int, default=2)
    a = ap.parse_args()
    rows = pq.read_table(a.pairs).to_pylist()
    shares = [list(range(c, len(rows), a.clients)) for c in range(a.clients)]
    latencies, rewards, errors = [], {}, []
    lock = threading.Lock()

    def client(idx):
        for k in range(0, len(idx), a.items):
            part = idx[k:k + a.items]
            body = {
                "query": [rows[i]["prompt"] + rows[i]["response"] for i in part],
                "prompts": [rows[i]["prompt"] for i in part],
                "labels": [rows[i]["reference"] for i in part],
            }
            t = time.perf_counter()
            try:
                out = post(a.url, body)
                bad = [e for e in out["extra_logs"]["error"] if e]
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                out, bad = None, [repr(e)]
            took = time.perf_counter() - t
            with lock:
                latencies.append(took)
                errors.extend(bad)
                if out:
                    rewards.update(zip(part, out["rewards"]))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    print(json.dumps({
        "clients": a.clients, "items_per_request": a.items, "pairs": len(rows), "requests": len(lat),
        "seconds": wall, "pairs_per_s": len(rows) / wall,
        "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": len(errors) + len(rows) - sum(v is not None for v in rewards.values()),
        "first_error": errors[0] if errors else None,
        "rewards": [rewards.get(i) for i in range(len(rows))],
    }))


if __name__ == "__main__":
    main()
