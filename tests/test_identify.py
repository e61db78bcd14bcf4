"""A model's family is told once per process (`mist.models.identify`), and told again once its file or folder is
edited in place."""

from __future__ import annotations

import json
import os

from mist.models import identify
from mist.models.identify import model_family
from support.families import save_folder, save_single_file, tiny_vae


def _counting_reads(monkeypatch) -> list[str]:
    """The single files `model_family` reads from here on (one entry per read)."""
    reads, real = [], identify.read_original_state_dict
    monkeypatch.setattr(identify, "read_original_state_dict",
                        lambda path, parts: reads.append(path) or real(path, parts))
    return reads


def _later(path, seconds: int = 10) -> None:
    """`path`'s modification time moved `seconds` on, so an edit is seen whatever the file system's time step."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_a_file_is_told_once_and_again_when_it_is_replaced(tmp_path, monkeypatch):
    path = save_single_file(tmp_path / "vae.safetensors", "flux", tiny_vae("flux"))
    reads = _counting_reads(monkeypatch)
    assert model_family(path).key == model_family(str(path)).key == "flux" and len(reads) == 1
    save_single_file(path, "sd3", tiny_vae("sd3"))  # the same name, now SD 3's VAE
    _later(path)
    assert model_family(path).key == "sd3" and len(reads) == 2


def test_a_folder_is_told_again_when_its_model_index_is_edited(tmp_path):
    folder = save_folder(tmp_path / "model", "sd3", tiny_vae("sd3"))
    assert model_family(folder).key == "sd3"
    index = folder / "model_index.json"
    index.write_text(json.dumps({"_class_name": "FluxPipeline"}))
    _later(index)
    assert model_family(folder).key == "flux"
