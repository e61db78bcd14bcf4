"""`mist evaluate`: does the protection hold? Purify the protected images as a mimic would, run the mimicry (img2img
with the user's own SD checkpoint) on them and on the originals with the same seeds, score the difference, and write
a report. Modules: pairs (which protected image is which original), metrics, purify, img2img, mimicry, scores, run,
report. The Python entry is `mist.evaluate` (in `mist.faces.api`). Importing this package imports no PyTorch.
"""
