"""PyTorch + Hugging Face PEFT reference for the GPU kit's side-by-side rows (`cargo xtask gpu-kit`).

Trains LoRA (r 8, alpha 16, q_proj and v_proj, no dropout) in bf16 on the GPU on the model folder
graft wrote (`graft random-model`: the same random weights), on the data rows graft trained on
(its train.json's `batch_rows`: indexes of rows in the CSV), encoded as graft encodes them with the plain template: the prompt
with the tokenizer's special tokens, cut from the start to leave room for the response, the
response without them, padded on the right to --max-len, the loss on the response only. Writes
one JSON object: step times, tokens/s of the median step, torch's allocator high-water mark.
Runs with whatever torch, transformers and peft the machine has (report.py records them).
"""

import argparse
import csv
import json
import statistics
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from report import peak_rss_mb, versions

# graft's shape-step recipe (configs/lm/shape-step.toml), which the kit's side.toml keeps.
PROMPT = "{title}. {abstract} {title}. {abstract} {title}. {abstract}"
RESPONSE = " {label}"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model folder graft wrote")
    p.add_argument("--tokenizer", required=True, help="the tokenizer.json graft read")
    p.add_argument("--data", required=True, help="the CSV graft read")
    p.add_argument("--graft-run", required=True, help="graft's train.json (batches, lr, seed)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", required=True)
    return p.parse_args()


def encode(tokenizer, row, max_len):
    prompt = tokenizer.encode(PROMPT.format(**row), add_special_tokens=True).ids
    response = tokenizer.encode(RESPONSE.format(**row), add_special_tokens=False).ids
    budget = max_len - len(response)
    prompt = prompt[len(prompt) - budget:] if len(prompt) > budget else prompt
    ids = prompt + response
    labels = [-100] * len(prompt) + response
    pad = max_len - len(ids)
    return ids + [0] * pad, [1] * len(ids) + [0] * pad, labels + [-100] * pad


def load_bf16(folder):
    """`dtype=` is what current transformers take; older ones refuse it (a TypeError or ValueError
    naming the keyword) and take `torch_dtype=`."""
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    except (TypeError, ValueError) as e:
        if "dtype" not in str(e):
            raise
    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)


def main():
    args = parse_args()
    graft_run = json.load(open(args.graft_run))
    torch.manual_seed(graft_run.get("seed", 42))
    transformers.logging.set_verbosity_error()
    with open(args.data, newline="") as f:
        rows = list(csv.DictReader(f))
    tokenizer = Tokenizer.from_file(args.tokenizer)
    # The GPU kit's dry run has no GPU: the same steps on the CPU check the script itself.
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    loaded = time.perf_counter()
    model = load_bf16(args.model).to(device)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    # graft keeps trainable tensors and AdamW's state in f32 over a bf16 base.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    load_seconds = time.perf_counter() - loaded
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=0.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, step_seconds, tokens = [], [], 0
    for batch in graft_run["batch_rows"]:
        encoded = [encode(tokenizer, rows[i], args.max_len) for i in batch]
        ids, mask, labels = (torch.tensor([e[k] for e in encoded], device=device) for k in range(3))
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
        tokens += ids.numel()
    # graft's statistic (train.rs's median_after_warmup): the first two left out of five or more.
    median = statistics.median(step_seconds[2:] if len(step_seconds) > 4 else step_seconds)
    per_step = tokens / len(step_seconds)
    json.dump({
        "steps": len(step_seconds),
        "losses": losses,
        "step_seconds": step_seconds,
        "step_seconds_median": median,
        "tokens_per_step": per_step,
        "tokens_per_s": per_step / median,
        "load_seconds": load_seconds,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
        "peak_rss_mb": peak_rss_mb(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": versions(),
    }, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
