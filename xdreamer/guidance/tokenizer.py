"""A CLIP tokenizer built locally, for tiny test pipelines and the embedded toy model.

No model hub is reachable offline, so the toy model and the tests cannot download SD's tokenizer.
This builds a byte-level BPE vocabulary in CLIP's format (vocab.json + merges.txt): every byte
symbol alone and with the end-of-word suffix "</w>", plus merges that turn each given word into
one token. Any other text still tokenizes, one byte symbol per character.
"""

from __future__ import annotations

import json
from pathlib import Path

import regex
from transformers import CLIPTokenizer

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
WORD_SUFFIX = "</w>"


def byte_symbols() -> dict[int, str]:
    """GPT-2 / CLIP mapping from the 256 byte values to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for value in range(256):
        if value not in printable:
            printable.append(value)
            codes.append(256 + extra)
            extra += 1
    return {value: chr(code) for value, code in zip(printable, codes)}


def _word_symbols(word: str, symbols: dict[int, str]) -> list[str]:
    """A word as its initial BPE pieces: byte symbols, the last one carrying "</w>"."""
    pieces = [symbols[b] for b in word.lower().encode("utf-8")]
    pieces[-1] += WORD_SUFFIX
    return pieces


def _write(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"),
        merges=str(out_dir / "merges.txt"),
        model_max_length=77,
    )


def _split_words(words: list[str]) -> list[str]:
    """Words as CLIP's pre-tokenizer would see them (letters runs, digits, punctuation runs)."""
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    pieces: list[str] = []
    for word in words:
        for piece in pattern.findall(word.lower()):
            if piece not in pieces:
                pieces.append(piece)
    return pieces


def build_clip_tokenizer(out_dir: str | Path, words: list[str]) -> CLIPTokenizer:
    """Write a CLIP-format tokenizer to `out_dir` in which each of `words` is one token.

    Multi-word strings are split the way CLIP splits text, so "front view" adds "front" and
    "view". The pad token is <|endoftext|> and the context is 77 tokens, as in Stable Diffusion.
    Returns the tokenizer after `save_pretrained(out_dir)`, so `CLIPTokenizer.from_pretrained`
    loads the same thing."""
    out_dir = Path(out_dir)
    symbols = byte_symbols()
    tokens: list[str] = list(symbols.values()) + [s + WORD_SUFFIX for s in symbols.values()]
    merges: list[tuple[str, str]] = []
    words = _split_words(words)
    # Left-to-right merges make each word one token; a word split by another word's earlier
    # merge is repaired by merging its final pieces, appended last so no earlier word changes.
    for word in words:
        pieces = _word_symbols(word, symbols)
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            if merged not in tokens:
                tokens.append(merged)

    for _ in range(len(words) + 1):
        vocab = {token: index for index, token in enumerate(tokens + [START_OF_TEXT, END_OF_TEXT])}
        tokenizer = _write(out_dir, vocab, merges)
        broken = False
        for word in words:
            pieces = tokenizer.backend_tokenizer.model.tokenize(
                "".join(_word_symbols(word, symbols))[: -len(WORD_SUFFIX)]
            )
            values = [p.value for p in pieces]
            if len(values) > 1:
                broken = True
                merged = values[0]
                for piece in values[1:]:
                    merges.append((merged, piece))
                    merged += piece
                    if merged not in tokens:
                        tokens.append(merged)
        if not broken:
            break
    tokenizer.save_pretrained(out_dir)
    return tokenizer
