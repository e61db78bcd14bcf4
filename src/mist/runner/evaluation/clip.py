"""CLIP image similarity and CMMD of the mimicry outputs, from a CLIP vision tower found on this machine (never
downloaded).

The tower is a folder given with `--clip` (a transformers CLIPVisionModelWithProjection, CLIPVisionModel or CLIPModel
saved with `save_pretrained`, or an SD diffusers folder's `safety_checker`, whose `StableDiffusionSafetyChecker` keeps
CLIP ViT-L/14's vision tower and projection), else the `safety_checker` folder of the SD diffusers folder being
evaluated. Images are resized (shortest side, bicubic), centre-cropped and normalised as the folder's
`preprocessor_config.json` says, else with CLIP's own constants (224 pixels, OpenAI's mean and standard deviation).
An embedding is the projected pooled output (the pooled output for a CLIPVisionModel, which has no projection),
scaled to unit length.

CLIP similarity: the cosine of the embeddings of two images (1: the same to CLIP). CMMD (Jayasumana et al. 2024,
"Rethinking FID"): the maximum mean discrepancy between two sets of embeddings with a Gaussian RBF kernel of bandwidth
sigma = 10, times 1000, as the paper reports it. Here the two sets are paired (the clean and the protected mimicry of
the same images), so the unbiased estimate for paired samples of equal size is used (Gretton et al. 2012, lemma 6:
the mean over i != j of k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)). It is 0 for identical sets, can dip
slightly below 0 by chance, and needs at least 2 images. (The paper's reference code averages over every pair, i = j
included: a biased estimate that is never below 0.)

CLIP-IQA (Wang, Chan & Loy 2023, "Exploring CLIP for assessing the look and feel of images"), where the folder is a
whole CLIPModel (a text tower beside the vision one): the probability CLIP gives an image of being a "Good photo."
rather than a "Bad photo.", a softmax of 100 times the cosines of the image's embedding with the two prompts' (as the
paper's code and torchmetrics compute it; 1: good, 0: bad). The prompts are tokenised with CLIP's BPE, which Mist
ships (`mist.models.tokenizer`): the same for every OpenAI CLIP model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

SAFETY_CHECKER = "safety_checker"  # the SD diffusers folder's subfolder that holds CLIP ViT-L/14's vision tower
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (its preprocessor_config.json)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CMMD_SIGMA = 10.0  # the RBF kernel's bandwidth in the CMMD paper
CMMD_SCALE = 1000.0  # the paper reports MMD times 1000
TOWER_CLASSES = ("CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPModel", "StableDiffusionSafetyChecker")
CLIP_IQA_PROMPTS = ("Good photo.", "Bad photo.")  # CLIP-IQA's antonym pair for quality
CLIP_IQA_LOGIT_SCALE = 100.0  # CLIP's trained temperature, as CLIP-IQA's code applies it


def clip_iqa_problem(folder: Path | None) -> str | None:
    """Why CLIP-IQA cannot run with the tower in `folder` (None: it can); the tower itself checked already."""
    if folder is None:
        return "it needs a whole CLIP model (text and vision towers): give one with --clip PATH"
    if tower_class(folder) != "CLIPModel":
        return (f"{folder.name} is a vision tower alone; CLIP-IQA compares images with two prompts, so it needs a "
                "whole CLIPModel folder (text and vision towers) given with --clip PATH")
    return None


def find_tower(given: str | None, model_where: object) -> tuple[Path | None, str | None]:
    """The folder of the CLIP vision tower to use (None and why not, for the report's skip line): `given` (checked:
    ValueError naming it), else the `safety_checker` folder of the SD diffusers folder `model_where`."""
    if given:
        folder = Path(given).expanduser()
        tower_class(folder)
        return folder, None
    beside = Path(str(model_where)) / SAFETY_CHECKER
    if (beside / "config.json").is_file():
        return beside, None
    return None, (f"give a CLIP vision tower folder with --clip PATH ({', '.join(TOWER_CLASSES[:3])} saved by "
                  "transformers, or an SD diffusers folder's safety_checker); the model evaluated has no "
                  f"{SAFETY_CHECKER} folder (Mist never downloads one)")


def tower_class(folder: Path) -> str:
    """The model class `folder`'s config.json names; ValueError naming the folder when it is not a CLIP tower."""
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"clip: {folder}: no config.json there (give a folder saved by transformers' "
                         "save_pretrained, or an SD diffusers folder's safety_checker)")
    try:
        names = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"clip: {config}: not a JSON model configuration") from None
    known = [name for name in names if name in TOWER_CLASSES]
    if not known:
        raise ValueError(f"clip: {folder}: its config.json names {names or 'no class'}, not one of "
                         f"{', '.join(TOWER_CLASSES)}")
    return known[0]


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shortest side to `size` (bicubic), centre-crop to `crop` (height, width), normalise."""

    size: int = CLIP_SIZE
    crop: tuple[int, int] = (CLIP_SIZE, CLIP_SIZE)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def of(cls, folder: Path) -> Preprocessing:
        """From `folder`'s preprocessor_config.json (transformers' CLIPImageProcessor fields), else CLIP's own."""
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            size = _side(config.get("size", CLIP_SIZE), "shortest_edge")
            crop = config.get("crop_size", size)
            crop = (_side(crop, "height"), _side(crop, "width"))
            return cls(size, crop, tuple(map(float, config.get("image_mean", CLIP_MEAN))),
                       tuple(map(float, config.get("image_std", CLIP_STD))))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"clip: {path}: not a CLIP image processor configuration") from None

    def __call__(self, picture: torch.Tensor) -> torch.Tensor:
        """`picture` (1, 3, H, W) in [-1, 1] as the tower's input (1, 3, crop height, crop width)."""
        import torch
        import torch.nn.functional as F

        height, width = picture.shape[-2:]
        scale = self.size / min(height, width)
        resized = F.interpolate((picture.float() + 1) / 2, size=(max(round(height * scale), self.crop[0]),
                                                                 max(round(width * scale), self.crop[1])),
                                mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (resized.shape[-2] - self.crop[0]) // 2, (resized.shape[-1] - self.crop[1]) // 2
        cropped = resized[..., top:top + self.crop[0], left:left + self.crop[1]]
        mean, std = torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)
        return (cropped - mean) / std


def _side(value: object, key: str) -> int:
    """A side length from an int or a transformers size dict ({"shortest_edge": n} or {"height": h, "width": w})."""
    if isinstance(value, dict):
        value = value.get(key, value.get("shortest_edge", value.get("height")))
    side = int(value)  # type: ignore[arg-type]
    if side < 1:
        raise ValueError(side)
    return side


class ClipTower:
    """A CLIP vision tower loaded from `folder` on `device` (float32, offline), giving unit-length image embeddings."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        name = tower_class(folder)
        if name == "StableDiffusionSafetyChecker":
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as model_class
        else:
            import transformers

            model_class = getattr(transformers, name)
        self.model = model_class.from_pretrained(folder, local_files_only=True).float().eval().to(device)
        self.reads_text = name == "CLIPModel"  # a text tower beside the vision one: CLIP-IQA can run
        self._prompt_embeddings: torch.Tensor | None = None  # CLIP-IQA's prompts, embedded once (`_anchors`)
        self.device = device
        self.preprocess = Preprocessing.of(folder)

    def embed(self, pictures: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unit-length embeddings (N, D), on the CPU, of `pictures` ((1, 3, H, W) each, in [-1, 1])."""
        import torch
        import torch.nn.functional as F

        batch = torch.cat([self.preprocess(picture.cpu()) for picture in pictures]).to(self.device)
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=batch).pooler_output
            projection = getattr(self.model, "visual_projection", None)
            embedded = projection(pooled) if projection is not None else pooled
        return F.normalize(embedded.float(), dim=-1).cpu()


    def quality(self, pictures: Sequence[torch.Tensor]) -> list[float]:
        """CLIP-IQA of each picture (see the module's note); only for a CLIPModel (`clip_iqa_problem`)."""
        return self.looks(self.embed(pictures))

    def looks(self, embeddings: torch.Tensor) -> list[float]:
        """CLIP-IQA of each row of `embeddings` (`embed`'s), against the prompts' embeddings, made once."""
        logits = CLIP_IQA_LOGIT_SCALE * embeddings @ self._anchors().T
        return logits.softmax(-1)[:, 0].tolist()

    def _anchors(self) -> torch.Tensor:
        """The unit-length text embeddings of CLIP_IQA_PROMPTS (2, D), on the CPU, computed at the first call."""
        if self._prompt_embeddings is None:
            import torch
            import torch.nn.functional as F

            from mist.models.tokenizer import clip_tokenizer

            prompts = clip_tokenizer()(list(CLIP_IQA_PROMPTS), padding=True, return_tensors="pt")
            with torch.no_grad():
                text = self.model.text_model(input_ids=prompts.input_ids.to(self.device),
                                             attention_mask=prompts.attention_mask.to(self.device)).pooler_output
                self._prompt_embeddings = F.normalize(self.model.text_projection(text).float(), dim=-1).cpu()
        return self._prompt_embeddings


def cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per row, the cosine similarity of unit-length embeddings `a` and `b` (N, D)."""
    return (a * b).sum(-1).tolist()


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA) -> float | None:
    """CMMD x 1000 between the paired sets of embeddings `x` and `y` (N, D each; row i of both from image i):
    unbiased for paired samples (see the module's note); None for fewer than 2 pairs."""
    import torch

    if len(x) < 2:
        return None
    if x.shape != y.shape:
        raise ValueError(f"cmmd: paired sets of the same shape needed, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))

    h = kernel(x, x) + kernel(y, y) - kernel(x, y) - kernel(y, x)
    n = len(x)
    off_diagonal = h.sum() - h.diagonal().sum()
    return CMMD_SCALE * (off_diagonal / (n * (n - 1))).item()
