"""Reference ids for graft's SentencePiece reader, from SentencePiece itself.

    spm_reference.py train CSV OUT_DIR   trains small BPE models on lines of CSV, then encodes
                                         other lines with each (OUT_DIR/NAME.model, NAME.json)
    spm_reference.py encode MODEL CSV OUT_JSON
                                         encodes lines of CSV with an existing model

Each JSON holds {"texts": [...], "ids": [[...]], "decoded": [...]}: the ids of every text
without BOS/EOS, as `SentencePieceProcessor.encode` gives them, and `decode` of those ids.
Run by crates/graft-tokenizer/tests/sentencepiece.rs; needs the `sentencepiece` package.
"""

import csv
import json
import os
import sys

import sentencepiece as spm

# Rows [0, TRAIN_ROWS) train the models; the 200 rows from TEST_START are encoded.
TRAIN_ROWS = 2000
TEST_START = 3000
TEST_ROWS = 200

# Texts that exercise what abstracts rarely have: runs of spaces, leading and trailing spaces,
# tabs and newlines, digits, and characters outside the training data (byte fallback).
EXTRA_TEXTS = [
    "",
    " ",
    "  two  leading spaces and  double  spaces  ",
    "tab\there\nnew line\r\n and 12345 digits 3.14159",
    "中文摘要：医学论文的分类。",
    "emoji \U0001F600 and accents: café, naïve, Ångström, µm, ½, ﬁ ligature",
    "sop [gMASK] </s> <unk> <s> text that spells special tokens",
]

# The settings of ChatGLM2/3's tokenizer.model that shape encoding (BPE, byte fallback, digits
# split, no normalization, spaces kept), and SentencePiece's defaults (NFKC, extra spaces
# removed) to exercise the compiled character map and the whitespace rules.
MODELS = {
    "chatglm_like": dict(
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
    ),
    "nfkc_defaults": dict(
        model_type="bpe",
        byte_fallback=True,
        split_digits=False,
    ),
}


def rows(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield f"{row['title']}\n{row['abstract']}"


def encode(model_path, texts, out_json):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ids = [sp.encode(t) for t in texts]
    decoded = [sp.decode(i) for i in ids]
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"texts": texts, "ids": ids, "decoded": decoded}, f, ensure_ascii=False)


def main(argv):
    if len(argv) == 3 and argv[0] == "train":
        csv_path, out_dir = argv[1], argv[2]
        all_rows = list(rows(csv_path))
        train = all_rows[:TRAIN_ROWS]
        texts = all_rows[TEST_START : TEST_START + TEST_ROWS] + EXTRA_TEXTS
        os.makedirs(out_dir, exist_ok=True)
        for name, settings in MODELS.items():
            prefix = os.path.join(out_dir, name)
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(train),
                model_prefix=prefix,
                vocab_size=3000,
                character_coverage=0.9995,
                max_sentence_length=1 << 16,
                num_threads=1,
                minloglevel=2,
                **settings,
            )
            encode(prefix + ".model", texts, prefix + ".json")
    elif len(argv) == 4 and argv[0] == "encode":
        model_path, csv_path, out_json = argv[1:]
        texts = list(rows(csv_path))[TEST_START : TEST_START + TEST_ROWS]
        encode(model_path, texts, out_json)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
