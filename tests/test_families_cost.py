"""benchmarks/families.py, checked cheaply: its UNets are the published designs (parameter counts, built on the meta
device), its configurations are named strictly, and one small step runs and counts the FLOPs the shapes give."""

from __future__ import annotations

import pytest

from support.benchmarks import benchmark


@pytest.fixture(scope="module")
def families():
    return benchmark("families")


@pytest.mark.parametrize("family, millions", [("sd2", 865.9), ("sdxl", 2567.5)])
def test_the_unets_are_the_published_designs(families, family, millions):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**families.UNETS[family])
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_configurations_are_named_strictly(families):
    assert families.parse_config("sdxl-denoiser-1024") == {"config": "sdxl-denoiser-1024", "family": "sdxl",
                                                            "kind": "denoiser", "size": 1024}
    assert families.parse_config("flux-encoder")["size"] == 512
    for wrong in ("sd2-transformer", "sd1-denoiser", "sd4-encoder", "sdxl"):
        with pytest.raises(ValueError, match="--configs: unknown configuration"):
            families.parse_config(wrong)


def test_a_small_denoiser_step_runs_and_its_flops_match_the_shapes_count(families):
    """SD 2.x's UNet run for real at 64 px in bf16 (1.8 GB of weights); SDXL's, with its added conditioning, counted
    on the meta device only (its 2.6B weights are too much for a test)."""
    spec = {**families.parse_config("sd2-denoiser-64"), "steps": 1, "precision": "bf16"}
    measured = families.run_one(spec)
    counted = families.run_one({**spec, "meta": True})
    assert measured["parameters_m"] == pytest.approx(900.1, abs=0.1) and measured["seconds"] > 0
    assert measured["tflop"] == pytest.approx(counted["tflop"], rel=0.01) and counted["tflop"] > 0
    sdxl = families.run_one({**families.parse_config("sdxl-denoiser-64"), "steps": 1, "precision": "bf16",
                             "meta": True})
    assert sdxl["tflop"] > counted["tflop"]


@pytest.mark.parametrize("family, millions", [("sd3", 2243.2), ("flux", 11901.4)])
def test_the_transformers_are_the_published_designs(families, family, millions):
    import torch

    with torch.device("meta"):
        denoiser = families.denoiser(family)
    assert sum(p.numel() for p in denoiser.parameters()) / 1e6 == pytest.approx(millions, abs=1.0)


def test_a_flow_step_is_counted_on_the_meta_device(families):
    """SD 3.5 medium and Flux dev at 64 px, shapes only: FLOPs and the weights' size in bf16 (Flux dev: 23.8 GB)."""
    sd3, flux = (families.run_one({**families.parse_config(f"{family}-denoiser-64"), "steps": 1, "precision": "bf16",
                                   "meta": True}) for family in ("sd3", "flux"))
    assert 0 < sd3["tflop"] < flux["tflop"]
    assert flux["weights_gb"] == pytest.approx(23.8 + 0.07, abs=0.1)
