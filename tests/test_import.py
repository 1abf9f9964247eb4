"""`import vlm2emb` stays light: no trainer, deepspeed, matplotlib or transformers."""

import subprocess
import sys


def test_top_level_import_is_light():
    code = (
        "import sys, vlm2emb\n"
        "heavy = [m for m in ('deepspeed', 'matplotlib', 'transformers', 'accelerate', 'peft', 'vlm2emb.train.loop',"
        " 'vlm2emb.train', 'tensorboard', 'wandb', 'mlflow', 'trackio')"
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


def _loaded_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of ``prefixes`` that a fresh interpreter has after ``statement``."""
    code = (
        "import sys\n"
        f"{statement}\n"
        f"print(','.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_data_readers_and_the_cli_entry_do_not_import_the_model_stack():
    # Reading and checking rows needs neither torch nor transformers (the CLI parses its
    # arguments before it imports what the command needs).
    heavy = ("torch", "transformers", "deepspeed", "accelerate", "peft", "vlm2emb.model")
    for statement in (
        "import vlm2emb.data.schema, vlm2emb.data.check, vlm2emb.data.sources",
        "import vlm2emb.cli",
    ):
        assert _loaded_after(statement, heavy) == [], statement


def test_the_backbone_registry_imports_no_family_until_one_is_looked_up():
    family_modules = _loaded_after("import vlm2emb.backbones", ("vlm2emb.backbones.",))
    assert set(family_modules) <= {"vlm2emb.backbones.base", "vlm2emb.backbones.registry"}
    assert "transformers" not in _loaded_after("import vlm2emb.backbones", ("transformers",))
