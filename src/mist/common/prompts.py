"""The prompts whose CLIP text embeddings a loaded model keeps: methods that condition the UNet use one of them
(Mist v1.2 conditions on "a painting" for a style and "a photo" for an object), and evaluation's mimicry too."""

from __future__ import annotations

STYLE_PROMPT = "a painting"
OBJECT_PROMPT = "a photo"
