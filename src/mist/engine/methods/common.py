"""Parameter declarations and helpers several methods share: one declaration per shared parameter name, so that its
command-line flag and web UI control mean the same for every method that takes it (the registry refuses a name
declared with another kind or other choices)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mist.common.prompts import OBJECT_PROMPT, STYLE_PROMPT
from mist.engine.methods.base import Method, param

if TYPE_CHECKING:
    from PIL import Image


def object_prompt_param() -> Any:
    """`object_prompt` (flag --object): condition the diffusion model on "a photo" instead of "a painting"."""
    return param(False, 'the images show an object: condition on "a photo" instead of "a painting"',
                 flag="--object", advanced=True, label="The image shows an object, not a style")


def target_param(help: str) -> Any:
    """`target` (flag --target): a target image file, None for the method's own default; `help` says what it is for
    and what the default is."""
    return param(None, help, file=True, label="Target image", advanced=True)


def prompt(object_prompt: bool) -> str:
    """The prompt a method conditions on: "a photo" for objects, "a painting" for styles (Mist's two prompts)."""
    return OBJECT_PROMPT if object_prompt else STYLE_PROMPT


class DenoiserMethod(Method):
    """A method whose loss runs the diffusion model conditioned on a prompt: it needs the encoder, the UNet and the
    text encoder, and takes its prompt's conditioning (`StableDiffusion.conditioning`) once per run, in `self.text`
    (None when `conditioning` gives no prompt)."""

    parts = frozenset({"encoder", "unet", "text_encoder"})

    def __init__(self, params, model, precision: str) -> None:
        super().__init__(params, model, precision)
        text = self.conditioning()
        self.text = model.conditioning(text) if text is not None else None

    def conditioning(self) -> str | None:
        """The prompt the denoiser is conditioned on: "a painting", or "a photo" with `object_prompt`."""
        return prompt(self.params.object_prompt)


def target_or(path: Path | None, default: Callable[[], Image.Image]) -> Image.Image:
    """The image at `path` when one is given, else `default()`."""
    from mist.common import images

    return images.read_image(path) if path else default()


def mist_target() -> Image.Image:
    """Mist v1.2's target pattern (high-contrast rings and checks), shipped with the package: the default target of
    the `mist` method."""
    return _shipped_image("target_pattern.png")


def mist_v2_target() -> Image.Image:
    """The target pattern of Mist-v2 and of Xue et al.'s code (tiled "MIST" lettering, 1440 x 1440; data/MIST.png of
    psyker-team/mist-v2, Apache-2.0), shipped with the package: a different image from Mist v1.2's."""
    return _shipped_image("mist_v2_target.png")


def _shipped_image(name: str) -> Image.Image:
    from importlib import resources

    from PIL import Image

    with resources.files("mist").joinpath(f"assets/{name}").open("rb") as handle:
        return Image.open(handle).convert("RGB")
