"""The CLIP tokenizer Stable Diffusion v1 conditions on, built offline from the BPE table shipped with Mist.

The table (`assets/bpe_simple_vocab_16e6.txt.gz`, MIT licence, from OpenAI's CLIP via open_clip) lists the byte-pair
merges in rank order. CLIP's vocabulary is derived from it: the 256 byte symbols, the same with an end-of-word marker,
one token per merge, then the start and end markers, 49408 entries in all.
"""

from __future__ import annotations

import copy
import gzip
from functools import lru_cache
from importlib import resources

import torch

CONTEXT_LENGTH = 77
END_OF_TEXT = 49407  # CLIP's end marker, with which SD v1's tokenizer also pads
_MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps this many merges so that the vocabulary totals 49408


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte-to-printable-character table, in byte order of its construction."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


@lru_cache(maxsize=1)
def clip_tokenizer():
    """A `transformers.CLIPTokenizer` equal to SD v1's `openai/clip-vit-large-patch14` one, with no file download."""
    from transformers import CLIPTokenizer

    table = resources.files("mist.models").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(table).decode("utf-8").split("\n")[1 : _MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


@lru_cache(maxsize=2)
def tokenizer_with(word: str):
    """A copy of the CLIP tokenizer that reads `word` as one new token, numbered right after the vocabulary (49408):
    textual inversion's placeholder. The shared tokenizer of `clip_tokenizer` is left as it is."""
    tokenizer = copy.deepcopy(clip_tokenizer())
    if tokenizer.add_tokens([word]) != 1:
        raise ValueError(f"placeholder: {word!r} is already a token of CLIP's vocabulary")
    return tokenizer


def tokenize(prompt: str, placeholder: str | None = None, pad: int | None = None) -> torch.Tensor:
    """Token ids of `prompt`, padded to 77 with the end marker as SD v1 expects, or with `pad` after the end marker
    (OpenCLIP pads with 0): shape (1, 77), int64. With `placeholder`, that word is one new token (`tokenizer_with`)."""
    tokenizer = clip_tokenizer() if placeholder is None else tokenizer_with(placeholder)
    ids = tokenizer(prompt, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    if pad is not None:
        end = int((ids[0] == END_OF_TEXT).nonzero()[0])
        ids[0, end + 1 :] = pad
    return ids
