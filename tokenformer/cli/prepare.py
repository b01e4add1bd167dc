"""`tokenformer prepare`: a corpus into GPT-NeoX indexed files (`tokenformer.data.prepare`)."""

from __future__ import annotations

import argparse

from tokenformer.data.documents import DEFAULT_GLOB
from tokenformer.data.prepare import MAX_BPE_VOCAB, prepare
from tokenformer.data.tokenizer import BYTE_VOCAB_SIZE
from tokenformer.options import MAX_SEED, number


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*",
                        help="text files, JSONL files (.jsonl, .jsonl.gz, .jsonl.zst) or folders of them; "
                        "none (and no --hf-dataset): the Python standard-library source")
    parser.add_argument("--out", required=True, help="output directory: new or empty (an earlier prepared dataset there "
                        "with --overwrite)")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (default), 'bpe' to train a byte-level BPE on the corpus, a tokenizer.json "
                        "path such as the GPT-NeoX-20B one (or a folder holding one), or a Hub name")
    parser.add_argument("--vocab-size", type=number(int, minimum=BYTE_VOCAB_SIZE, maximum=MAX_BPE_VOCAB), default=2048,
                        help="vocabulary of the trained BPE (with --tokenizer bpe)")
    parser.add_argument("--text-field", default="text", help="the JSONL field / dataset column holding the text")
    parser.add_argument("--glob", default=DEFAULT_GLOB,
                        help="comma-separated file-name patterns searched for in input folders")
    parser.add_argument("--hf-dataset", default=None,
                        help="a Hugging Face dataset: a save_to_disk directory, a data folder or a Hub name "
                        "(needs the datasets extra)")
    parser.add_argument("--hf-split", default="train", help="the split of --hf-dataset")
    parser.add_argument("--hf-config", default=None,
                        help="the configuration of a Hub dataset that has several (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--valid-fraction", type=number(float, minimum=0, below=1), default=0.01,
                        help="share of documents for validation (at least one when there are two or more)")
    parser.add_argument("--seed", type=number(int, minimum=0, maximum=MAX_SEED), default=0,
                        help="seed of the train/validation assignment")
    parser.add_argument("--max-documents", type=number(int, minimum=1), default=None, help="keep only the first N documents")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def main(args: argparse.Namespace) -> None:
    """Tokenize a corpus into GPT-NeoX indexed files for training.

    `tokenformer prepare corpus/ --out data/corpus` reads text files, JSONL (.jsonl, .jsonl.gz,
    .jsonl.zst) or a Hugging Face dataset (--hf-dataset), or with no input the Python
    standard-library source, and writes OUT/train_text_document.{bin,idx},
    OUT/valid_text_document.{bin,idx}, OUT/tokenizer.json and OUT/prepare.json.
    Tokenizers: byte (default), bpe (trained on the corpus, --vocab-size) or a tokenizer.json."""
    metadata = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       text_field=args.text_field, valid_fraction=args.valid_fraction,
                       hf_dataset=args.hf_dataset, hf_split=args.hf_split, hf_config=args.hf_config,
                       glob=args.glob, seed=args.seed,
                       max_documents=args.max_documents, progress=False if args.quiet else None)
    if not args.quiet:
        train, valid = metadata["splits"]["train"], metadata["splits"]["valid"]
        print(f"wrote {args.out}: train {train['documents']:,} documents / {train['tokens']:,} tokens, "
              f"valid {valid['documents']:,} / {valid['tokens']:,}; {metadata['tokenizer']} tokenizer, "
              f"vocab {metadata['vocab_size']:,}, {metadata['tokens_per_second']:,.0f} tokens/s")
