"""T5's prompt reader (the SentencePiece unigram tokenizer SD 3.x and Flux feed their T5-XXL encoder), built offline
from the vocabulary shipped with Mist (`assets/t5_unigram.txt.gz`, Apache-2.0, provenance in assets/NOTICE-t5.md).

The pipeline is SentencePiece's as T5 was trained with it: the text normalised by the model's own compiled NFKC map and
runs of spaces folded into one; spaces turned into "▁" with one put before the text; the most probable split into
pieces (unigram model); the end marker `</s>` (1) appended; padding with `<pad>` (0). A prompt longer than the length
asked for is cut so that `</s>` still ends it.
"""

from __future__ import annotations

import base64
import gzip
from functools import lru_cache
from importlib import resources

import torch

PAD, END, UNKNOWN = 0, 1, 2
_SPECIAL = ("<pad>", "</s>", "<unk>")
_SENTINELS = 100  # T5's <extra_id_N> pieces, the last ids of the vocabulary


def _read_vocabulary() -> tuple[bytes, list[tuple[str, float]]]:
    """(the normaliser's compiled character map, [(piece, score)] in id order) from the shipped asset."""
    packed = resources.files("mist.models").joinpath("assets/t5_unigram.txt.gz").read_bytes()
    lines = gzip.decompress(packed).decode("utf-8").split("\n")
    pieces = []
    for line in lines[1:]:
        if line:
            score, piece = line.split("\t", 1)
            pieces.append((piece, float(score)))
    return base64.b64decode(lines[0]), pieces


@lru_cache(maxsize=1)
def t5_tokenizer():
    """A `tokenizers.Tokenizer` reading prompts as T5's SentencePiece model does (no padding or truncation set)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    charsmap, pieces = _read_vocabulary()
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=UNKNOWN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                                 normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", END)])
    sentinels = [piece for piece, _ in pieces[-_SENTINELS:]]
    tokenizer.add_special_tokens([*_SPECIAL, *sentinels])
    return tokenizer


def t5_ids(prompt: str, length: int) -> torch.Tensor:
    """Token ids of `prompt` for T5, ended by `</s>` and padded with 0 (cut to fit) to `length`: shape (1, length),
    int64."""
    ids = t5_tokenizer().encode(prompt).ids
    if len(ids) > length:
        ids = ids[: length - 1] + [END]
    return torch.tensor([ids + [PAD] * (length - len(ids))], dtype=torch.int64)
