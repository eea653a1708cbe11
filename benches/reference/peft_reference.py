"""PyTorch + Hugging Face PEFT reference for `cargo xtask bench --reference`.

Measures, on CPU in fp32, what graft's LoRA bench measures: training throughput of LoRA
(r 8, alpha 16, query/value, classifier head as modules_to_save) on
BertForSequenceClassification at batch 8 x up-to-128 tokens, or inference throughput at
batch 32 x 128 tokens. One mode per process, so that peak RSS belongs to that mode alone.
Writes one JSON object to --out.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification

from report import peak_rss_mb, versions

TEMPLATE = "{title}. {abstract}"
MAX_LEN = 128
TRAIN_BATCH = 8
INFER_BATCH = 32
TRAIN_WARMUP_STEPS = 3
INFER_WARMUP_BATCHES = 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["train", "infer"], required=True)
    p.add_argument("--model", required=True, help="all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, help="CSV with title, abstract and label columns")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--steps", type=int, default=30, help="training steps (the first 3 are warm-up)")
    p.add_argument("--infer-batches", type=int, default=10, help="timed inference batches (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: usable cores)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def read_rows(path, needed):
    """The first `needed` rows as (text, label); fewer if the file is shorter."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = TEMPLATE.format(title=row["title"] or "", abstract=row["abstract"] or "")
            rows.append((text, int(row["label"])))
            if len(rows) == needed:
                break
    if not rows:
        sys.exit(f"{path}: no data rows")
    return rows


def batch_rows(rows, index, size):
    """Batch `index` of consecutive rows, wrapping around the end of the data."""
    start = index * size
    return [rows[(start + i) % len(rows)] for i in range(size)]


def load_model(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            sys.exit(f"{model_dir}: no {name} (fetch the model with `cargo xtask fetch-model minilm`)")
    # The untrained classifier head is expected; keep the load report out of the bench output.
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # graft's BERT applies no dropout in the base model; zero it here so both do the same work.
    model = BertForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=2,
        dtype=torch.float32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # adds the classifier head to modules_to_save
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
    )
    # Inference too runs through the unmerged adapter, as graft's evaluation does.
    return tokenizer, get_peft_model(model, config)


def train(args, tokenizer, model):
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.01)
    rows = read_rows(args.data, args.steps * TRAIN_BATCH)

    # Tokenized ahead of the timed loop: the steps time the model, not the tokenizer.
    batches = []
    for step in range(args.steps):
        batch = batch_rows(rows, step, TRAIN_BATCH)
        enc = tokenizer(
            [text for text, _ in batch],
            truncation=True,
            max_length=MAX_LEN,
            padding="longest",
            return_tensors="pt",
        )
        labels = torch.tensor([label for _, label in batch])
        batches.append((enc, labels))

    step_seconds, losses, tokens, real_tokens = [], [], [], []
    for enc, labels in batches:
        started = time.perf_counter()
        out = model(**enc, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - started)
        losses.append(out.loss.item())
        tokens.append(enc["input_ids"].numel())
        real_tokens.append(int(enc["attention_mask"].sum()))

    skip = TRAIN_WARMUP_STEPS if len(step_seconds) > TRAIN_WARMUP_STEPS else 0
    timed = sum(step_seconds[skip:])
    median = statistics.median(step_seconds[skip:])
    return {
        "steps": args.steps,
        "warmup_steps": skip,
        "batch_size": TRAIN_BATCH,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_seconds_median": median,
        # graft's statistic (eval.json's train_tokens_per_s): the mean tokens of a step, batch x
        # padded length, over the median step.
        "train_tokens_per_s": statistics.mean(tokens[skip:]) / median,
        # The same over the total time of the timed steps (slow outliers weigh in).
        "train_tokens_per_s_total_time": sum(tokens[skip:]) / timed,
        # Without padding (attention-mask ones), over the median step.
        "train_nonpad_tokens_per_s": statistics.mean(real_tokens[skip:]) / median,
        "step_seconds": step_seconds,
        "losses": losses,
    }


def infer(args, tokenizer, model):
    model.eval()
    count = INFER_WARMUP_BATCHES + args.infer_batches
    rows = read_rows(args.data, count * INFER_BATCH)
    batches = []
    for index in range(count):
        batch = batch_rows(rows, index, INFER_BATCH)
        batches.append(
            tokenizer(
                [text for text, _ in batch],
                truncation=True,
                max_length=MAX_LEN,
                padding="max_length",
                return_tensors="pt",
            )
        )
    batch_seconds = []
    with torch.inference_mode():
        for enc in batches:
            started = time.perf_counter()
            model(**enc)
            batch_seconds.append(time.perf_counter() - started)
    timed = batch_seconds[INFER_WARMUP_BATCHES:]
    median = statistics.median(timed)
    return {
        "batches": len(timed),
        "warmup_batches": INFER_WARMUP_BATCHES,
        "batch_size": INFER_BATCH,
        "seq_len": MAX_LEN,
        "infer_batch_seconds_median": median,
        "infer_tokens_per_s": INFER_BATCH * MAX_LEN / median,
        "batch_seconds": batch_seconds,
        "losses": [],
    }


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, model = load_model(args.model)
    result = train(args, tokenizer, model) if args.mode == "train" else infer(args, tokenizer, model)
    report = {
        "system": "pytorch+peft",
        "versions": versions(),
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        **result,
        "peak_rss_mb": peak_rss_mb(),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("step_seconds", "batch_seconds")}))


if __name__ == "__main__":
    main()
