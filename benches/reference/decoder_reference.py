"""PyTorch + Hugging Face PEFT reference for `cargo xtask bench --reference --model smollm2`.

Measures, on CPU in fp32, what graft's decoder bench measures on SmolLM2-135M-Instruct, one mode
per process so that peak RSS belongs to that mode alone:
- prepare: converts the GGUF graft reads into a Hugging Face folder once (transformers
  dequantizes it to the same f32 values graft computes with), so that the timed processes load
  safetensors and their RSS holds no conversion;
- train: causal-LM LoRA (r 8, alpha 16, q_proj/v_proj) on the batches graft trained on (the
  data rows its train.json names), the answer's tokens and the closing <|im_end|> in the loss;
- score: verbalizer classification of the held-out rows graft scored (its eval.json), through
  graft's trained adapter, reading the next-token logits of the label words after the prompt;
- generate: greedy generation with a KV cache through graft's trained adapter.
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
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from report import peak_rss_mb, versions


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["prepare", "train", "score", "generate"], required=True)
    p.add_argument("--gguf", help="prepare: the GGUF file graft reads")
    p.add_argument("--model", required=True, help="the Hugging Face folder prepare writes")
    p.add_argument("--recipe", help="train/score: JSON of graft's recipe (system, max_prompt_chars, prompt, labels, lr, ...)")
    p.add_argument("--data", help="train/score: the CSV graft read")
    p.add_argument("--graft-run", help="train: graft's train.json; score: graft's eval.json")
    p.add_argument("--adapter", help="score/generate: graft's trained adapter folder (PEFT layout)")
    p.add_argument("--prompt", help="generate: the user turn")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True, help="JSON file to write (prepare: unused)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def median_after_warmup(values):
    """graft's statistic (train.rs's median_after_warmup): the first two left out of five or more."""
    skip = 2 if len(values) > 4 else 0
    return statistics.median(values[skip:])


def prepare(args):
    if os.path.isfile(os.path.join(args.model, "model.safetensors")):
        return {"prepared": args.model, "converted": False}
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers will not save a model it read from GGUF: copy its (already f32) tensors into
    # a plain model of the same config.
    loaded.config.quantization_config = None
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)
    return {"prepared": args.model, "converted": True}


def load(args, adapter=None):
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if adapter:
        # graft writes PEFT's layout: PEFT loads it as it would its own.
        model = PeftModel.from_pretrained(model, adapter)
    return tokenizer, model


def chatml_prompt(system, user):
    """graft's `chatml` template up to the answer (SmolLM2 adds no BOS)."""
    turns = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return turns + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def read_rows(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def fill(template, row):
    return template.format(**{k: (v or "") for k, v in row.items()})


def user_text(recipe, row):
    """The prompt cut as graft cuts it: at most max_prompt_chars bytes of UTF-8, whole characters."""
    text = fill(recipe["prompt"], row)
    limit = recipe["max_prompt_chars"]
    if limit > 0:
        text = text.encode("utf-8")[:limit].decode("utf-8", "ignore")
    return text


def train(args):
    recipe = json.load(open(args.recipe, encoding="utf-8"))
    graft = json.load(open(args.graft_run, encoding="utf-8"))
    rows = read_rows(args.data)
    tokenizer, model = load(args)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=recipe["r"],
            lora_alpha=recipe["lora_alpha"],
            lora_dropout=0.0,
            target_modules=recipe["target_modules"],
        ),
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe["lr"], weight_decay=recipe["weight_decay"])

    def encode(row):
        prompt = tokenizer(chatml_prompt(recipe["system"], user_text(recipe, row)), add_special_tokens=False)["input_ids"]
        answer = tokenizer(fill(recipe["response"], row) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = (prompt + answer)[: recipe["max_len"]]
        labels = ([-100] * len(prompt) + answer)[: recipe["max_len"]]
        return ids, labels

    # Tokenized ahead of the timed loop, right-padded to the longest, as graft batches.
    batches = []
    for batch_rows in graft["batch_rows"]:
        encoded = [encode(rows[i]) for i in batch_rows]
        longest = max(len(ids) for ids, _ in encoded)
        pad = lambda xs, v: xs + [v] * (longest - len(xs))
        batches.append(
            (
                torch.tensor([pad(ids, 0) for ids, _ in encoded]),
                torch.tensor([pad([1] * len(ids), 0) for ids, _ in encoded]),
                torch.tensor([pad(labels, -100) for _, labels in encoded]),
            )
        )
    step_seconds, losses, tokens = [], [], []
    for ids, mask, labels in batches:
        started = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - started)
        losses.append(out.loss.item())
        tokens.append(ids.numel())
    median = median_after_warmup(step_seconds)
    return {
        "steps": len(step_seconds),
        "trainable_params": sum(p.numel() for p in trainable),
        "step_seconds_median": median,
        # graft's statistic: the mean tokens of a step (batch x padded length) over the median step.
        "train_tokens_per_s": statistics.mean(tokens) / median,
        "step_seconds": step_seconds,
        "tokens": tokens,
        "losses": losses,
    }


def score(args):
    recipe = json.load(open(args.recipe, encoding="utf-8"))
    graft = json.load(open(args.graft_run, encoding="utf-8"))
    rows = read_rows(args.data)
    tokenizer, model = load(args, args.adapter)
    model.eval()
    labels = recipe["labels"]
    label_ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in labels]
    if any(len(ids) != 1 for ids in label_ids):
        sys.exit(f"label words {labels} are not one token each")
    label_ids = [ids[0] for ids in label_ids]
    truth, predicted = [], []
    batch_size = graft["batch_size"]
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(graft["rows"]), batch_size):
            batch = [rows[i] for i in graft["rows"][start : start + batch_size]]
            encoded = [
                tokenizer(chatml_prompt(recipe["system"], user_text(recipe, row)), add_special_tokens=False)["input_ids"]
                for row in batch
            ]
            longest = max(len(ids) for ids in encoded)
            # Left padding, positions counted from each prompt's first token, and the head at
            # the last position only (logits_to_keep): what graft computes.
            ids = torch.tensor([[0] * (longest - len(x)) + x for x in encoded])
            mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in encoded])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1, :]
            predicted += logits[:, label_ids].argmax(-1).tolist()
            truth += [labels.index(row[recipe["label_column"]]) for row in batch]
    seconds = time.perf_counter() - started
    tp = sum(1 for t, p in zip(truth, predicted) if t == 1 and p == 1)
    fp = sum(1 for t, p in zip(truth, predicted) if t == 0 and p == 1)
    fn = sum(1 for t, p in zip(truth, predicted) if t == 1 and p == 0)
    return {
        "count": len(truth),
        "seconds": seconds,
        "rows_per_s": len(truth) / seconds,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "accuracy": sum(1 for t, p in zip(truth, predicted) if t == p) / max(len(truth), 1),
    }


def generate(args):
    tokenizer, model = load(args, args.adapter)
    model.eval()
    ids = tokenizer(chatml_prompt(None, args.prompt), add_special_tokens=False, return_tensors="pt")
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True)
    seconds = time.perf_counter() - started
    new = out[0][ids["input_ids"].shape[1] :]
    return {
        "prompt_tokens": ids["input_ids"].shape[1],
        "new_tokens": len(new),
        "seconds": seconds,
        "new_tokens_per_s": len(new) / seconds,
        "text": tokenizer.decode(new, skip_special_tokens=True),
    }


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result = {"prepare": prepare, "train": train, "score": score, "generate": generate}[args.mode](args)
    report = {
        "system": "pytorch+peft",
        "versions": versions(),
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        **result,
        "peak_rss_mb": peak_rss_mb(),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("step_seconds", "tokens", "losses", "text")}))


if __name__ == "__main__":
    main()
