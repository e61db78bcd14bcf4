"""T5's tokenizer built from the vocabulary Mist ships: ids as the published T5 tokenizer (google's T5 v1.1 JSON, the
one SD 3.x's and Flux's pipelines read with) gives them, and as transformers' own T5 tokenizer gives them when built
from the same pieces; `</s>` ends every prompt, padding is 0, long prompts are cut at the lengths SD 3.x and Flux use.
"""

from __future__ import annotations

import pytest

from mist.models.t5_tokenizer import END, PAD, _read_vocabulary, t5_ids, t5_tokenizer

# Ids from the published tokenizer JSON (stable-diffusion.cpp's embedded copy, see assets/NOTICE-t5.md), recorded once.
PUBLISHED = {
    "a painting": [3, 9, 3924, 1],
    "a photo": [3, 9, 1202, 1],
    "": [1],
    "Ｃafé  naïve   résumé — “quotes”": [18131, 3, 29, 9, 2, 162, 1417, 4078, 154, 3, 318, 105, 8270, 15, 7, 153, 1],
    "一幅山水画，水墨风格": [3, 2, 6, 2, 1],
    "ｆｕｌｌｗｉｄｔｈ ① ﬁ": [423, 12018, 189, 209, 361, 1],
    "Hello <extra_id_0> world": [8774, 3, 32099, 296, 1],
    "tab\tand\nnewline": [3808, 11, 126, 747, 1],
    "  leading and trailing  ": [1374, 11, 5032, 53, 3, 1],
    "emoji 🎨 art": [3, 15, 51, 21892, 3, 2, 768, 1],
}
LONG = "a very detailed oil painting of a mountain lake at dawn, " * 60  # 841 pieces (a last "▁" too) and </s>


def test_the_vocabulary_is_t5s():
    charsmap, pieces = _read_vocabulary()
    assert len(pieces) == 32100 and charsmap
    assert [p for p, _ in pieces[:4]] == ["<pad>", "</s>", "<unk>", "▁"]
    assert pieces[-1][0] == "<extra_id_0>" and pieces[-100][0] == "<extra_id_99>"


@pytest.mark.parametrize("text", list(PUBLISHED))
def test_ids_are_the_published_tokenizers(text):
    assert t5_tokenizer().encode(text).ids == PUBLISHED[text]


def _transformers_t5():
    from transformers import T5Tokenizer

    charsmap, pieces = _read_vocabulary()
    return T5Tokenizer(vocab=pieces, _spm_precompiled_charsmap=charsmap, extra_ids=0,
                       additional_special_tokens=[piece for piece, _ in pieces[-100:]])


@pytest.mark.parametrize("length", [77, 256, 512])
@pytest.mark.parametrize("text", ["a painting", "Ｃafé  naïve   résumé — “quotes”", "一幅山水画，水墨风格", LONG])
def test_padded_and_cut_as_transformers_t5_tokenizer(text, length):
    expected = _transformers_t5()(text, padding="max_length", max_length=length, truncation=True).input_ids
    ids = t5_ids(text, length)
    assert ids.shape == (1, length) and ids[0].tolist() == expected


def test_a_cut_prompt_still_ends_with_the_end_marker_and_a_short_one_is_padded_with_zeros():
    assert t5_ids(LONG, 256)[0, -1] == END and len(t5_tokenizer().encode(LONG).ids) == 842
    assert t5_ids("a painting", 8)[0].tolist() == [3, 9, 3924, END, PAD, PAD, PAD, PAD]
