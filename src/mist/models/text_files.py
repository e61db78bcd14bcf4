"""SD 3.x's and Flux's text encoders from single .safetensors files, told apart by their keys and shapes, built from
their weights alone and run once on Mist's prompts (`flow_text.join` makes each family's conditioning of them).

Where they come from: files the user names (`--text-encoders`) in the usual layout, transformers' own key names
(CLIP: `text_model.`, with or without `text_projection.weight`; T5: `encoder.block.`, `shared.weight`), and the towers
inside an SD 3 `_incl_clips` file (`text_encoders.clip_l.transformer.`, `.clip_g.`, `.t5xxl.`). Two CLIP files are
CLIP ViT-L/14 (the narrower, 768 wide in SD 3 and Flux) and OpenCLIP ViT-bigG/14 (the wider, 1280); one alone is
CLIP-L. Shapes not in the weights are CLIP's (64-wide attention heads; quick GELU in CLIP-L, GELU in OpenCLIP-G) and
T5 v1.1's (relative position buckets reaching 128 tokens).

Each tower is built without weights and given the file's: the CLIP towers in float32, T5 in float32 when stored so and
otherwise in bfloat16 (T5-XXL: 9.5 GB; fp16 overflows in T5's feed-forward layers, bf16 has float32's range; a float8
file is widened to it). A file of scaled float8 weights (ComfyUI's `_scaled` files, which store a scale per weight) is
refused. Each tower is freed once it has run.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from mist.models import flow_text
from mist.models.flow_files import Header, below, header, read, stored_bytes
from mist.models.t5_tokenizer import t5_ids
from mist.models.tokenizer import END_OF_TEXT

_INSIDE = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
           "t5": "text_encoders.t5xxl.transformer."}
TITLES = {"clip_l": "CLIP-L", "clip_g": "OpenCLIP-G", "t5": "T5-XXL"}
_NEEDED = {"sd3": ("clip_l", "clip_g"), "flux": ("clip_l", "t5")}
_READ = {"sd3": ("clip_l", "clip_g", "t5"), "flux": ("clip_l", "t5")}  # SD 3.x runs without T5 too
_FAMILY_TITLES = {"sd3": "SD 3.x", "flux": "Flux"}
_CLIP_PROBE = "text_model.embeddings.token_embedding.weight"
_T5_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_HEAD = 64


@dataclass(frozen=True)
class Tower:
    """One text encoder in a file: its kind (clip_l, clip_g, t5), the file, the prefix its keys carry there, and
    its weights' shapes and stored types (named without the prefix)."""

    kind: str
    path: Path
    prefix: str
    head: Header

    def memory(self) -> int:
        """The bytes its weights take once built (`_t5_type`: T5's type; CLIP in float32)."""
        return stored_bytes(self.head, _t5_type(self).itemsize if self.kind == "t5" else 4)


def towers(model: Path, model_head: Header, files: Iterable[Path], family: str) -> dict[str, Tower]:
    """kind -> Tower: the text encoders inside the model file `model` and in `files`; ValueError naming the file
    for one that is no text encoder Mist knows, is named twice, is one the family does not read (OpenCLIP-G for
    Flux), or when the family lacks one it needs (SD 3.x: CLIP-L and OpenCLIP-G, T5 optional; Flux: CLIP-L and
    T5)."""
    found = {kind: Tower(kind, model, prefix, below(model_head, prefix)) for kind, prefix in _INSIDE.items()
             if any(key.startswith(prefix) for key in model_head)}
    clips = []
    for path in files:
        head = header(path)
        if _T5_PROBE in head:
            _add(found, Tower("t5", path, "", head))
        elif _CLIP_PROBE in head:
            clips.append(Tower("clip_l", path, "", head))
        else:
            raise ValueError(f"{path}: not a text encoder Mist knows (CLIP-L, OpenCLIP-G or T5-XXL in the "
                             "transformers layout)")
    if len(clips) > 2:
        raise ValueError(f"{clips[2].path}: a third CLIP text encoder: SD 3.x reads two, Flux one")
    clips.sort(key=lambda tower: tower.head[_CLIP_PROBE][0][1])
    for kind, tower in zip(("clip_l", "clip_g")[: len(clips)], clips, strict=True):
        _add(found, Tower(kind, tower.path, "", tower.head))
    unread = [tower for kind, tower in found.items() if kind not in _READ[family]]
    if unread:
        raise ValueError(f"{unread[0].path}: {TITLES[unread[0].kind]}, a text encoder {_FAMILY_TITLES[family]} does "
                         f"not read (it reads {' and '.join(TITLES[kind] for kind in _READ[family])})")
    missing = [TITLES[kind] for kind in _NEEDED[family] if kind not in found]
    if missing:
        raise ValueError(f"{model}: its {' and '.join(missing)} text encoder{'s' if len(missing) > 1 else ''} "
                         f"{'are' if len(missing) > 1 else 'is'} needed: name the file(s) with --text-encoders")
    for tower in found.values():
        _check_types(tower)
    return found


def _add(found: dict[str, Tower], tower: Tower) -> None:
    if tower.kind in found:
        raise ValueError(f"{tower.path}: a second {TITLES[tower.kind]} text encoder (one is in "
                         f"{found[tower.kind].path.name})")
    found[tower.kind] = tower


def _check_types(tower: Tower) -> None:
    """ValueError naming the file for scaled float8 weights, or float8 this PyTorch cannot read."""
    if any(key.endswith(("scale_weight", "scale_input")) or key == "scaled_fp8" for key in tower.head):
        raise ValueError(f"{tower.path}: {TITLES[tower.kind]} in scaled float8 (a scale per weight), which Mist does "
                         "not read: give the fp16 or bf16 file")
    if any(kind.startswith("F8") for _, kind in tower.head.values()) and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"{tower.path}: {TITLES[tower.kind]} in float8, which this PyTorch cannot read: give the "
                         "fp16 or bf16 file")


def _t5_type(tower: Tower) -> torch.dtype:
    return torch.float32 if all(kind == "F32" for _, kind in tower.head.values()) else torch.bfloat16


def _clip_config(tower: Tower):
    from transformers import CLIPTextConfig

    head = tower.head
    vocab, width = head[_CLIP_PROBE][0]
    projection = head.get("text_projection.weight", ((width,),))[0][0]
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // _CLIP_HEAD),
                          intermediate_size=head["text_model.encoder.layers.0.mlp.fc1.weight"][0][0],
                          num_hidden_layers=_layers(head, "text_model.encoder.layers.{}.mlp.fc1.weight"),
                          max_position_embeddings=head["text_model.embeddings.position_embedding.weight"][0][0],
                          hidden_act="gelu" if tower.kind == "clip_g" else "quick_gelu", projection_dim=projection,
                          bos_token_id=END_OF_TEXT - 1, eos_token_id=END_OF_TEXT, pad_token_id=END_OF_TEXT)


def _t5_config(tower: Tower):
    from transformers import T5Config

    head = tower.head
    block = "encoder.block.0.layer."
    vocab, width = head["shared.weight" if "shared.weight" in head else "encoder.embed_tokens.weight"][0]
    buckets, heads = head[block + "0.SelfAttention.relative_attention_bias.weight"][0]
    gated = block + "1.DenseReluDense.wi_0.weight" in head
    inner = block + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight")
    return T5Config(vocab_size=vocab, d_model=width, d_kv=head[_T5_PROBE][0][0] // heads, num_heads=heads,
                    d_ff=head[inner][0][0],
                    num_layers=_layers(head, "encoder.block.{}.layer.0.SelfAttention.q.weight"),
                    relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu",
                    is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


def _layers(head: Header, pattern: str) -> int:
    count = 0
    while pattern.format(count) in head:
        count += 1
    return count


def _built(tower: Tower, kind: type, config, dtype: torch.dtype) -> torch.nn.Module:
    """`kind` of `config` with the tower's weights read in `dtype` (keys the class has no use for are left);
    ValueError naming the file when some of its weights are missing."""
    wanted = {tower.prefix + key: key for key in tower.head if key != "text_model.embeddings.position_ids"
              and not (key == "text_projection.weight" and not kind.__name__.endswith("WithProjection"))}
    try:
        model, info = kind.from_pretrained(None, config=config, state_dict=read(tower.path, wanted, dtype),
                                           dtype=dtype, output_loading_info=True)
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{tower.path}: not a {TITLES[tower.kind]} text encoder Mist can read ({exc})") from exc
    missing = sorted(set(info.get("missing_keys", ())) - {"encoder.embed_tokens.weight"})
    if missing:
        raise ValueError(f"{tower.path}: not a whole {TITLES[tower.kind]} text encoder: {len(missing)} weights "
                         f"missing (first: {missing[0]})")
    return model.eval().requires_grad_(False)


def embed(found: dict[str, Tower], family: str, joint_width: int, guidance: bool,
          prompts: Iterable[str]) -> flow_text.Embeddings:
    """Each family's conditioning of `prompts` (`flow_text.join`) from the towers `found`, each built, run and freed
    in turn."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    prompts = list(prompts)
    kind = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
    if family == "sd3" and "text_projection.weight" not in found["clip_l"].head:
        raise ValueError(f"{found['clip_l'].path}: a CLIP-L without its text projection, which SD 3.x's pooled "
                         "embedding needs")
    clip = []
    for name in _NEEDED["sd3"] if family == "sd3" else ("clip_l",):
        model = _built(found[name], kind, _clip_config(found[name]), torch.float32)
        clip.append(flow_text.clip_outputs(model, 0 if name == "clip_g" else END_OF_TEXT, prompts, family))
        del model
    t5 = None
    if "t5" in found:
        model = _built(found["t5"], T5EncoderModel, _t5_config(found["t5"]), _t5_type(found["t5"]))
        length = flow_text.t5_length(family, guidance)
        t5 = flow_text.run_t5(model, lambda prompt: t5_ids(prompt, length), prompts)
        del model
    gc.collect()
    return flow_text.join(family, joint_width, guidance, prompts, clip, t5)
