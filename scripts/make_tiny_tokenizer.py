"""Build the bundled tiny SentencePiece model used by the `tiny` preset.

It mimics the LLaMA tokenizer's settings (BPE, byte fallback, split digits, identity normaliser,
unk=0 / bos=1 / eos=2, no pad piece) at 2,000 pieces, trained on the instructions and answers of the
SoMeData multimodal test sets (Apache-2.0). The real LLaMA vocabulary cannot be redistributed; this
one exists so that a fresh install runs the whole pipeline with no download.

    python scripts/make_tiny_tokenizer.py ../shared/somedata src/somelvlm/assets/tiny-llm-tokenizer.model
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib

import sentencepiece as spm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("somedata", type=pathlib.Path, help="folder with SoMeData *.json files")
    ap.add_argument("out", type=pathlib.Path, help="where to write the .model file")
    ap.add_argument("--vocab-size", type=int, default=2000)
    args = ap.parse_args()

    lines: list[str] = []
    for path in sorted(args.somedata.rglob("*.json")):
        for sample in json.loads(path.read_text()):
            lines.extend(sample["text_input"].splitlines())
            lines.extend(sample["text_output"].splitlines())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(set(l for l in lines if l.strip()))),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=200_000,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    args.out.write_bytes(model.getvalue())
    print(f"wrote {args.out} ({len(model.getvalue())} bytes, {args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
