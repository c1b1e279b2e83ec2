"""Train the byte-level BPE tokenizer shipped in fms/resources/tokenizer from its corpus.txt."""

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "fms" / "resources" / "tokenizer"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Llama-2, then <pad>=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


def train(text: str, vocab_size: int, min_frequency: int) -> Tokenizer:
    # Every byte is in the alphabet, so no input is ever unknown and the BPE
    # model needs no unk token.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    # Llama-2 convention: BOS on every encode, EOS left to the generation loop.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


# A minimal chat format for demos and tests (see the tokenizer's README): each message as
# "<|role|>\n" + content + "\n", after BOS; the assistant's turn opens with "<|assistant|>\n".
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tokenizer_config() -> dict:
    # Enough for transformers' PreTrainedTokenizerFast to load the same folder;
    # no space clean-up so its decode round-trips exactly like ours.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=SHIPPED_DIR / "corpus.txt")
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)

    minimum_vocab = len(SPECIAL_TOKENS) + 256
    if args.vocab_size < minimum_vocab:
        parser.error(f"--vocab-size {args.vocab_size} is too small: need at least {minimum_vocab} (specials + 256 bytes)")
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus} is not a file")

    text = args.corpus.read_text(encoding="utf-8")
    tokenizer = train(text, args.vocab_size, args.min_frequency)
    if tokenizer.get_vocab_size() != args.vocab_size:
        # min_frequency ran out of pairs first: say so rather than ship a surprise size.
        print(
            f"warning: trained vocab has {tokenizer.get_vocab_size()} tokens, asked for {args.vocab_size}; "
            f"add text to {args.corpus} or lower --min-frequency",
            file=sys.stderr,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=True)
    with open(args.out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")
    num_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    print(
        f"wrote {args.out}/tokenizer.json ({tokenizer.get_vocab_size()} tokens; corpus {len(text.encode())} bytes "
        f"-> {num_tokens} tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
