"""PyTorch eager reference for benches/train_speed.sh: the same LLaMA config (transformers'
LlamaForCausalLM, eager attention, f32), the same GRAM step (stage 2: label-smoothed
cross-entropy over the A/B logits at the last position; stage 1: next-token loss on the target
part), AdamW, random tokens of the same shape. --lora-rank R trains a peft LoRA adapter (alpha
2R, all seven projections); --train-layers N only the top N layers and the final norm (lower
layers then run without autograd recording, as in gram-train); --recompute turns on
transformers' gradient checkpointing. --device cuda times it on a GPU (synchronised before each
clock read), for benches/gpu_check.sh. Prints one JSON line like `gram-train bench`, with the
process's peak RSS."""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--stage", default="finetune", choices=["finetune", "pretrain"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--train-layers", type=int, default=0)
    ap.add_argument("--recompute", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = json.load(open(a.model_config))
    kind = cfg.pop("model_type")
    config = AutoConfig.for_model(kind, **{k: v for k, v in cfg.items() if k != "architectures"})
    config._attn_implementation = "eager"
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = AutoModelForCausalLM.from_config(config).float().train().to(dev)
    trained = "full fine-tuning"
    if a.train_layers:
        n = config.num_hidden_layers
        for name, p in model.named_parameters():
            top = any(name.startswith(f"model.layers.{i}.") for i in range(n - a.train_layers, n))
            p.requires_grad_(top or name.startswith("model.norm."))
        trained = f"top {a.train_layers} of {n} layers"
    if a.lora_rank:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, target_modules=TARGETS)
        model = get_peft_model(model, lcfg).base_model.model
        trained = f"LoRA r={a.lora_rank} (peft)"
    if a.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-8, weight_decay=0.0)
    label_ids = torch.tensor([1, 2], device=dev)
    eps = 0.1
    times = []
    b, t = a.batch_size, a.seq_len
    for i in range(a.warmup + a.steps):
        ids = torch.randint(3, config.vocab_size, (b, t), device=dev)
        mask = torch.ones_like(ids)
        sync()
        t0 = time.perf_counter()
        if a.stage == "finetune":
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
            w = model.lm_head.weight[label_ids]  # only the two label rows, as gram-train does
            logits = h @ w.T
            target = torch.randint(0, 2, (b,), device=dev)
            loss = F.cross_entropy(logits, target, label_smoothing=eps)
        else:
            p = t // 4
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, p - 1 : t - 1]
            logits = model.lm_head(h)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, p:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"params": n_params, "batch_size": b, "seq_len": t, "steps": a.steps,
                      "step_s_median": med, "tokens_per_s": b * t / med, "trained": trained,
                      "recompute": a.recompute, "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
