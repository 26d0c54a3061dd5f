import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_with_hf_trainer.py"


def test_hf_trainer_example_then_correct(tmp_path, tiny_base, tiny_emulator, tiny_data):
    p = subprocess.run([sys.executable, str(EXAMPLE), "--emulator", str(tiny_emulator), "--data", str(tiny_data),
                        "--output", str(tmp_path / "ad"), "--steps", "2", "--correct-to", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_base)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["directions"] > 0 and len(m["layers"]) == 14  # all-linear: every block linear, not lm_head
