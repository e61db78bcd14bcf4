"""SD 3.x's and Flux's prompt conditioning, made once at load from a diffusers folder's text encoders (or from single
files': `text_files`), which are then freed (T5-XXL alone has 4.7B parameters: it is loaded, run on Mist's prompts and
let go before the transformer is read, and never held during an attack).

- SD 3.x: the penultimate hidden states of CLIP ViT-L/14 (`text_encoder`) and OpenCLIP ViT-bigG/14
  (`text_encoder_2`), both with their text projection, side by side (768 + 1280 = 2048 wide), zero-padded to T5's
  width and followed by T5's 256 token states (`text_encoder_3`); the pooled embedding is both towers' projected
  pooled outputs side by side (2048). A folder without T5 (diffusers' pipeline accepts `text_encoder_3=None`) gets
  zeros in T5's place, as that pipeline makes them: the model runs, on a weaker prompt signal than it was trained
  with.
- Flux: T5's token states (512 tokens for dev, 256 for schnell, as diffusers' FluxPipeline and schnell's model card
  use) and CLIP ViT-L/14's pooled output (`text_encoder`, no projection: 768).

CLIP prompts are read with the CLIP BPE Mist ships, padded to 77 with the pad token the folder's tokenizer names (the
end marker, or OpenCLIP's "!" = 0); T5 prompts with the folder's own tokenizer (`tokenizer_3` for SD 3.x,
`tokenizer_2` for Flux), padded to its length, never fetched from the network (single files: the T5 tokenizer Mist
ships, `t5_tokenizer`).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mist.models.tokenizer import END_OF_TEXT, tokenize

SD3_T5_TOKENS = 256
FLUX_T5_TOKENS = {True: 512, False: 256}  # by whether the transformer takes a guidance strength (dev) or not
# The folders' text encoder and tokenizer sub-folders: (CLIP towers, T5) for each family.
CLIP_TOWERS = {"sd3": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
               "flux": (("text_encoder", "tokenizer"),)}
T5_TOWER = {"sd3": ("text_encoder_3", "tokenizer_3"), "flux": ("text_encoder_2", "tokenizer_2")}

Embeddings = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
ClipOutputs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # prompt -> (token states, pooled embedding)


def clip_pad(tokenizer: Path) -> int:
    """The id a folder's CLIP tokenizer pads with: 0 where it names "!" (OpenCLIP's padding), else the end marker."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tokenizer / name).is_file():
            pad = json.loads((tokenizer / name).read_text(encoding="utf-8")).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                return 0 if pad == "!" else END_OF_TEXT
    return END_OF_TEXT


def embed(folder: Path, family: str, joint_width: int, guidance: bool, prompts: Iterable[str]) -> Embeddings:
    """Token states (1, L, joint_width) and pooled embeddings of `prompts`, float32 on the CPU, from `folder`'s text
    encoders (`joint_width`: the transformer's text width; `guidance`: Flux dev)."""
    prompts = list(prompts)
    clip = [_clip_outputs(folder / tower, folder / tokenizer, prompts, family) for tower, tokenizer in
            CLIP_TOWERS[family]]
    tower, tokenizer = T5_TOWER[family]
    t5 = None
    if (folder / tower / "config.json").is_file():
        t5 = t5_states(folder / tower, folder / tokenizer, prompts, t5_length(family, guidance))
    elif family == "flux":
        raise ValueError(f"{folder}: a Flux.1 folder without its T5 text encoder ({tower}/): Flux needs it")
    return join(family, joint_width, guidance, prompts, clip, t5)


def t5_length(family: str, guidance: bool) -> int:
    """How many tokens T5 reads a prompt as: SD 3.x's, or Flux dev's (`guidance`) or schnell's."""
    return SD3_T5_TOKENS if family == "sd3" else FLUX_T5_TOKENS[guidance]


def join(family: str, joint_width: int, guidance: bool, prompts: list[str], clip: list[ClipOutputs],
         t5: dict[str, torch.Tensor] | None) -> Embeddings:
    """Each family's conditioning from its towers' outputs: `clip` one (states, pooled) per prompt for each CLIP tower
    in the family's order, `t5` T5's states per prompt (None: SD 3.x without T5, zeros in its place)."""
    if t5 is None:
        t5 = {prompt: torch.zeros(1, t5_length(family, guidance), joint_width) for prompt in prompts}
    if family == "flux":
        return {p: t5[p] for p in prompts}, {p: clip[0][p][1] for p in prompts}
    states, pooled = {}, {}
    for prompt in prompts:
        joined = torch.cat([outputs[prompt][0] for outputs in clip], dim=-1)
        joined = torch.nn.functional.pad(joined, (0, joint_width - joined.shape[-1]))
        states[prompt] = torch.cat([joined, t5[prompt]], dim=1)
        pooled[prompt] = torch.cat([outputs[prompt][1] for outputs in clip], dim=-1)
    return states, pooled


def pretrained(kind: type, folder: Path, **options: object) -> Any:
    """`kind.from_pretrained` on a local sub-folder (never the network), its failure as one line naming the folder."""
    try:
        return kind.from_pretrained(str(folder), local_files_only=True, **options)
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{folder}: cannot read this model part: {detail}") from exc


def _clip_outputs(tower: Path, tokenizer: Path, prompts: list[str], family: str) -> ClipOutputs:
    """prompt -> (penultimate hidden states, pooled embedding) of the CLIP tower in the folder `tower`."""
    return clip_outputs(pretrained(clip_class(family), tower, dtype=torch.float32).eval(), clip_pad(tokenizer), prompts,
                        family)


def clip_class(family: str) -> type[torch.nn.Module]:
    """The class a `family`'s CLIP towers are built as: with their text projection for SD 3.x (its pooled embedding
    is projected), without for Flux."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel


@torch.no_grad()
def clip_outputs(model: torch.nn.Module, pad: int, prompts: list[str], family: str) -> ClipOutputs:
    """prompt -> (penultimate hidden states, pooled embedding) of the CLIP tower `model`, prompts padded with `pad`
    after the end marker: the projected pooled output for SD 3.x, the bare pooled output for Flux."""
    out = {}
    for prompt in prompts:
        result = model(tokenize(prompt, pad=pad), output_hidden_states=True)
        pooled = result.text_embeds if family == "sd3" else result.pooler_output
        out[prompt] = (result.hidden_states[-2].float(), pooled.float())
    return out


def t5_states(tower: Path, tokenizer: Path, prompts: list[str], length: int) -> dict[str, torch.Tensor]:
    """prompt -> T5's last hidden state (1, length, width), float32: the encoder is loaded in the type its files hold
    (bf16 / fp16 in the published folders: 9.5 GB for T5-XXL), run, and freed before this returns."""
    from transformers import AutoTokenizer, T5EncoderModel

    reader = pretrained(AutoTokenizer, tokenizer)
    model = pretrained(T5EncoderModel, tower, dtype="auto").eval()
    out = run_t5(model, lambda prompt: reader(prompt, padding="max_length", max_length=length, truncation=True,
                                              return_tensors="pt").input_ids, prompts)
    del model
    gc.collect()
    return out


@torch.no_grad()
def run_t5(model: torch.nn.Module, ids_of: Callable[[str], torch.Tensor], prompts: list[str]
           ) -> dict[str, torch.Tensor]:
    """prompt -> the last hidden state (float32) of the T5 encoder `model` on the token ids `ids_of` gives."""
    return {prompt: model(ids_of(prompt)).last_hidden_state.float() for prompt in prompts}
