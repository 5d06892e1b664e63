"""An SDXL LoRA (UNet + both text encoders, min-SNR-γ, noise offset, cosine schedule) on the tiny SDXL fixture:
the kohya file has SDXL's names and loads through Atelier's ``<lora:...>`` on the SDXL base."""
import json
import sys
from pathlib import Path

import torch

from modules.diffusion import checkpoints as ck
from modules.diffusion.loading import load_sd_model
from modules.diffusion.lora import apply_loras
from modules.diffusion.prompt_parser import extract_extra_networks
from modules.fixtures import diffusion
from modules.training.images.kohya_format import read_kohya_lora
from modules.training.images.train_command import run_image_training

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import write_shapes  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "training" / "lora-sdxl-tiny.yaml"


def test_sdxl_lora_trains_and_loads(tmp_path):
    diffusion.ensure(tmp_path)
    write_shapes(tmp_path / "shapes", count=4)
    result = run_image_training(str(CONFIG), [f"dataset={tmp_path / 'shapes'}", "run_name=xl", "max_steps=4"],
                                data_dir=tmp_path, mode="lora")
    assert result.finished
    records = [json.loads(l) for l in (tmp_path / "training/xl/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)
    assert records[0]["lr"] < records[1]["lr"]                            # warm-up, then cosine down
    (path,) = result.outputs
    tensors, meta = read_kohya_lora(path)
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)   # SGM block names, as sd-scripts
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_min_snr_gamma"] == "5.0"
    infos = ck.list_checkpoints(tmp_path / "models" / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sdxl"))

    def image():
        return sd.pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images[0]
    before = image()
    calls = extract_extra_networks("<lora:tiny-sdxl-shapes:1>")[1]["lora"]
    with apply_loras(sd, calls, tmp_path / "models" / "Lora") as applied:
        assert applied.warnings == []
        with_lora = image()
    assert abs(with_lora - before).max() > 1e-4
