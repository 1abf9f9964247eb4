"""`import vlm2emb` stays light: no trainer, deepspeed, matplotlib or transformers."""

import subprocess
import sys


def test_top_level_import_is_light():
    code = (
        "import sys, vlm2emb\n"
        "heavy = [m for m in ('deepspeed', 'matplotlib', 'transformers', 'accelerate', 'peft', 'vlm2emb.train.loop')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
        "assert hasattr(vlm2emb, 'EmbeddingModel')\n"
        "print('deepspeed' in sys.modules, 'matplotlib' in sys.modules, 'vlm2emb.train.loop' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "", f"heavy modules imported by `import vlm2emb`: {out[0]}"
    # Touching EmbeddingModel still loads neither the trainer nor deepspeed.
    assert out[1] == "False False False"
