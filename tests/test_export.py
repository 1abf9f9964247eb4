"""vlm2emb export: merged and adapter-only exports of real short training runs (LoRA, DoRA,
full), reloaded by vlm2emb, plain transformers, peft and sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.demo import I2T_INSTRUCTION as I2T
from vlm2emb.data.demo import T2I_INSTRUCTION as T2I
from vlm2emb.export import ExportError, export_model, verification_image
from vlm2emb.model import CONFIG_NAME
from vlm2emb.train.config import load_recipe
from vlm2emb.train.loop import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INSTRUCTION = "Find the matching caption."


def _run(out: Path, *overrides: str) -> Path:
    base = [
        f"output_dir={out}",
        "train.max_steps=3",
        "train.batch_size=8",
        "train.log_steps=1",
        "train.eval_before=false",
        "train.eval_batch_size=128",
        "train.learning_rate=0.01",  # LoRA B starts at zero: big steps make the adapter matter
        f"data.query_instruction={INSTRUCTION}",
    ]
    train(load_recipe(RECIPE, [*base, *overrides]), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three real training runs: LoRA (with eval.json), DoRA, full; LoRA and full keep step 2."""
    root = tmp_path_factory.mktemp("export-runs")
    return {
        "lora": _run(root / "lora", "model.lora=true", "model.lora.r=4", "train.save_steps=2"),
        "dora": _run(root / "dora", "model.lora.use_dora=true", "model.lora.r=4", "data.eval=[]"),
        "full": _run(root / "full", "train.save_steps=2", "data.eval=[]"),
    }


@pytest.fixture(scope="module")
def items(digit_images) -> list:
    return [
        "a handwritten digit seven",
        "a much longer caption: the digit three written in thick strokes",
        digit_images[0],
        {"text": "which digit is this?", "image": digit_images[1]},
    ]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _source(path: Path) -> EmbeddingModel:
    # The checkpoint as trained: adapter unmerged, float32.
    return EmbeddingModel.from_pretrained(path, merge_lora=False)


def _pool_by_hand(backbone, model: EmbeddingModel, items) -> torch.Tensor:
    """Plain transformers forward on vlm2emb's collated inputs, last-token pooling, L2 norm."""
    inputs = model.collate(items, INSTRUCTION)
    with torch.no_grad():
        hidden = backbone(**inputs).last_hidden_state  # [B, L, H]
    last = inputs["attention_mask"].sum(dim=1) - 1  # right padding: last real token per row
    emb = hidden[torch.arange(hidden.shape[0]), last]  # [B, H]
    return torch.nn.functional.normalize(emb.float(), dim=-1)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_merged_export_reloads_in_vlm2emb_and_plain_transformers(runs, items, kind, tmp_path):
    from transformers import AutoModel, Qwen2VLForConditionalGeneration

    src_dir = runs[kind] / "final"
    out = tmp_path / "merged"
    result = export_model(src_dir, out, mode="merged")
    assert result.verifications[0].passed and result.verifications[0].max_abs_diff <= 1e-4
    files = _files(out)
    assert {"config.json", "model.safetensors", CONFIG_NAME, "README.md", "tokenizer.json"} <= files
    assert not any(f.startswith("adapter") for f in files)  # merged: no adapter left
    assert not [f for f in files if f.endswith(PICKLES)]
    assert not list(tmp_path.glob(".tmp-*"))
    saved = json.loads((out / CONFIG_NAME).read_text())
    assert saved["pooling"] == "last" and saved["query_instruction"] == INSTRUCTION
    assert saved["export"] == {"mode": "merged", "dtype": "fp32", "format": "vlm2emb"}

    source = _source(src_dir)
    expected = source.encode_queries(items)  # [4, d]
    torch.testing.assert_close(
        EmbeddingModel.from_pretrained(out).encode_queries(items), expected, atol=1e-4, rtol=0
    )
    # Plain transformers, pooling by hand: the exported directory is an ordinary checkpoint.
    plain = AutoModel.from_pretrained(out).eval()
    torch.testing.assert_close(_pool_by_hand(plain, source, items), expected, atol=1e-4, rtol=0)
    family_cls = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(_pool_by_hand(family_cls.model, source, items), expected, atol=1e-4, rtol=0)
    if kind != "full":
        # The adapter changed the model: the checkpoint's base weights alone embed differently.
        base_only = _pool_by_hand(AutoModel.from_pretrained(src_dir).eval(), source, items)
        assert (base_only - expected).abs().max() > 1e-3


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["022", "027"])
def test_export_honours_the_umask(runs, tmp_path, mask):
    """An export's folder and files get the permissions the umask gives any new file
    (mkdtemp made the folder 0700 and safetensors the weights 0600)."""
    import os
    import stat

    previous = os.umask(mask)
    try:
        export_model(runs["full"] / "final", tmp_path / "export")
        out = tmp_path / "export"
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~mask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_only_export(runs, items, kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    src_dir = runs[kind] / "final"
    out = tmp_path / "adapter"
    result = export_model(src_dir, out, mode="adapter")
    assert result.verifications[0].passed
    files = _files(out)
    assert {"adapter_model.safetensors", "adapter_config.json", CONFIG_NAME, "README.md"} <= files
    assert "config.json" not in files and not any(f.startswith("model") for f in files)  # no base weights
    assert not [f for f in files if f.endswith(PICKLES)]
    assert json.loads((out / CONFIG_NAME).read_text())["base_model"] == "tiny:qwen2_vl"
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is (kind == "dora")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert any("lora_magnitude_vector" in k for k in keys) is (kind == "dora")

    expected = _source(src_dir).encode_queries(items)
    # The recorded base is tiny:qwen2_vl built with the run's seed; the checkpoint holds the
    # same base weights, so pass it as the base.
    reloaded = EmbeddingModel.from_pretrained(out, base_model=src_dir)
    torch.testing.assert_close(reloaded.encode_queries(items), expected, atol=1e-4, rtol=0)
    rebuilt = EmbeddingModel.from_pretrained(out, seed=42)  # tiny base rebuilt with the run's seed
    torch.testing.assert_close(rebuilt.encode_queries(items), expected, atol=1e-4, rtol=0)
    # peft alone: base model + adapter folder.
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(src_dir), str(out)).eval()
    torch.testing.assert_close(_pool_by_hand(plain, reloaded, items), expected, atol=1e-4, rtol=0)


def test_adapter_only_needs_a_lora_checkpoint(runs, tmp_path):
    with pytest.raises(ExportError, match="needs a LoRA"):
        export_model(runs["full"] / "final", tmp_path / "x", mode="adapter")
    assert not (tmp_path / "x").exists()


def test_intermediate_checkpoint_exports_its_own_weights(runs, items, tmp_path):
    step_dir = runs["full"] / "checkpoints" / "step-2"
    assert (step_dir / "state").is_dir()  # accelerate state with pickles: must not be copied
    out = export_model(step_dir, tmp_path / "step2").out_dir
    assert not [f for f in _files(out) if f.endswith(PICKLES)] and "state" not in {
        p.name for p in out.iterdir()
    }
    exported = EmbeddingModel.from_pretrained(out).encode(items)
    torch.testing.assert_close(exported, _source(step_dir).encode(items), atol=1e-4, rtol=0)
    final = _source(runs["full"] / "final").encode(items)
    assert (exported - final).abs().max() > 1e-3  # step 2, not the final weights


def test_run_dir_resolves_to_final(runs, tmp_path):
    result = export_model(runs["full"], tmp_path / "out")
    assert result.source == runs["full"] / "final"


def test_sharded_export(runs, items, tmp_path):
    out = tmp_path / "sharded"
    export_model(runs["lora"] / "final", out, max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    for shard in shards:
        assert (out / shard).stat().st_size <= 200_000 * 1.5  # one tensor may overflow a little
    # Every tensor the index names is in the shard it names.
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as f:
            assert name in set(f.keys())
    expected = _source(runs["lora"] / "final").encode_queries(items)
    torch.testing.assert_close(
        EmbeddingModel.from_pretrained(out).encode_queries(items), expected, atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_export(runs, items, tmp_path, dtype, torch_dtype):
    out = tmp_path / dtype
    result = export_model(runs["dora"] / "final", out, dtype=dtype)
    assert result.dtype == dtype and result.verifications[0].min_cosine >= 0.99
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in list(f.keys())}
    assert dtypes == {torch_dtype}
    expected = _source(runs["dora"] / "final").encode_queries(items)
    got = EmbeddingModel.from_pretrained(out, torch_dtype=dtype).encode_queries(items)
    assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.99


def test_model_card_lists_eval_numbers_and_recipe(runs, tmp_path):
    out = export_model(runs["lora"] / "final", tmp_path / "card", license="apache-2.0").out_dir
    card = (out / "README.md").read_text()
    report = json.loads((runs["lora"] / "eval.json").read_text())
    assert card.startswith("---\nlibrary_name: vlm2emb")
    assert "license: apache-2.0" in card and "base_model: tiny:qwen2_vl" in card
    results = card.split("## Evaluation")[1]  # (the instruction table has rows per task too)
    for task, metrics in report["tasks"].items():
        row = next(line for line in results.splitlines() if line.startswith(f"| {task} |"))
        assert f"{metrics['hit@1']:.4f}" in row and f"{metrics['mrr']:.4f}" in row
    assert f"{report['average']['hit@1']:.4f}" in card
    assert "`demo:digits/train`" in card and "LoRA (r 4, alpha 64)" in card
    assert INSTRUCTION in card and "EmbeddingModel.from_pretrained" in card
    assert "learning_rate: 0.01" in card  # the recipe itself
    # eval.json scores final/: an intermediate checkpoint's card does not claim its numbers.
    step_card = export_model(runs["lora"] / "checkpoints" / "step-2", tmp_path / "s2").out_dir / "README.md"
    step_card = step_card.read_text()
    assert (
        "intermediate checkpoint" in step_card and "| digits-i2t |" not in step_card.split("## Evaluation")[1]
    )
    assert "model-index" not in step_card  # nor does its front matter
    # Without a run next to it (a plain saved model) the card says so instead.
    plain = EmbeddingModel.from_pretrained(runs["full"] / "final").save_pretrained(tmp_path / "bare" / "m")
    card = (export_model(plain, tmp_path / "bare-export").out_dir / "README.md").read_text()
    assert "No evaluation report" in card and "No training recipe" in card


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_front_matter_is_hub_metadata(runs, tmp_path):
    """The YAML front matter against the run's own files, and read by huggingface_hub."""
    out = export_model(runs["lora"] / "final", tmp_path / "meta").out_dir
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    report = json.loads((runs["lora"] / "eval.json").read_text())
    saved = json.loads((runs["lora"] / "final" / CONFIG_NAME).read_text())
    assert front["library_name"] == "vlm2emb" and front["pipeline_tag"] == "feature-extraction"
    assert front["base_model"] == saved["base_model"] == "tiny:qwen2_vl"
    assert front["license"] == "unknown"  # no --license: not claimed
    assert "datasets" not in front  # demo: data is no hub dataset
    (entry,) = front["model-index"]
    assert entry["name"] == "meta"
    got = {(r["dataset"]["name"], m["name"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    metrics = ("hit@1", "hit@5", "ndcg@5", "mrr")
    want = {(t, c): round(m[c], 4) for t, m in report["tasks"].items() for c in metrics}
    assert got == want
    assert {r["dataset"]["type"] for r in entry["results"]} == {"demo:digits/eval"}

    from huggingface_hub import ModelCard

    parsed = ModelCard(card).data
    assert parsed.license == "unknown" and parsed.library_name == "vlm2emb"
    assert {(e.dataset_name, e.metric_name): e.metric_value for e in parsed.eval_results} == want

    # Training summary from metrics.jsonl and trainer_state.json.
    records = [json.loads(x) for x in (runs["lora"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    state = json.loads((runs["lora"] / "final" / "trainer_state.json").read_text())
    assert f"- Steps: 3 ({round(3 / state['steps_per_epoch'], 2)} epochs" in card
    assert f"Final loss: {last['loss']:.4f}, in-batch accuracy: {last['accuracy']:.3f}" in card
    assert f"Training time: {last['elapsed_s']:.1f} s" in card
    from importlib.metadata import version

    import vlm2emb

    assert f"| vlm2emb | {vlm2emb.__version__} | {vlm2emb.__version__} |" in card
    for name in ("torch", "transformers", "peft"):
        assert f"| {name} | {version(name)} | {version(name)} |" in card
    # A hub dataset in data.train is listed by its id.
    from vlm2emb.export import model_card

    recipe_dir = tmp_path / "hubrun"
    recipe_dir.mkdir()
    (recipe_dir / "recipe.yaml").write_text("data:\n  train: [hf:org/pairs:train, local.jsonl]\n")
    text = model_card(
        saved,
        run_dir=recipe_dir,
        mode="merged",
        format="vlm2emb",
        dtype="fp32",
        license="mit",
        verifications=[],
    )
    meta = _front_matter(text)
    assert meta["datasets"] == ["org/pairs"] and meta["license"] == "mit" and "model-index" not in meta


def test_instructions_travel_with_the_model(runs, digit_images, tmp_path):
    """The rows' instructions per dataset, recorded at training, reach the export and its card."""
    from vlm2emb.data.demo import resolve_demo

    rows = [json.loads(x) for x in resolve_demo("demo:digits/train", runs["lora"]).read_text().splitlines()]
    # Independent recount: the row's own instruction, else the recipe's default.
    want: dict = {}
    for row in rows:
        q = row.get("instruction") or INSTRUCTION
        want.setdefault(row["dataset"], {}).setdefault(q, 0)
        want[row["dataset"]][q] += 1
    saved = json.loads((runs["lora"] / "final" / CONFIG_NAME).read_text())["instructions"]
    assert {t: {e["query"][0]: e["rows"]} for t, e in saved.items()} == want
    assert all(e["query_distinct"] == 1 and e["target"] == [None] for e in saved.values())

    out = export_model(runs["lora"] / "final", tmp_path / "instr").out_dir
    assert json.loads((out / CONFIG_NAME).read_text())["instructions"] == saved
    card = (out / "README.md").read_text()
    assert f"| digits-i2t | {want['digits-i2t'][I2T]} | `{I2T}` | none |" in card
    assert 'task="digits-i2t")' in card and 'task="digits-t2i")' in card  # the usage snippet
    model = EmbeddingModel.from_pretrained(out)
    items = [digit_images[0], "a handwritten digit one"]
    torch.testing.assert_close(
        model.encode_queries(items, task="digits-i2t"), model.encode(items, instruction=I2T)
    )
    torch.testing.assert_close(model.encode_targets(items, task="digits-i2t"), model.encode(items))
    # An explicit instruction wins over the task's.
    torch.testing.assert_close(
        model.encode_queries(items, "Other.", task="digits-i2t"), model.encode(items, instruction="Other.")
    )
    with pytest.raises(
        ValueError, match="unknown task 'nope'; the model was trained on: digits-i2t, digits-t2i"
    ):
        model.encode_queries(items, task="nope")


def test_sentence_transformers_export_matches(runs, digit_images, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = export_model(runs["lora"] / "final", tmp_path / "st", format="sentence-transformers").out_dir
    result = _files(out)
    assert {
        "modules.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "chat_template.jinja",
    } <= result
    ours = EmbeddingModel.from_pretrained(out)
    st = SentenceTransformer(str(out), device="cpu")
    texts = ["a handwritten digit seven", "two", "a much longer caption about a handwritten digit three"]
    # Queries carry the saved instruction (a sentence-transformers prompt), documents none.
    torch.testing.assert_close(
        st.encode_query(texts, convert_to_tensor=True), ours.encode_queries(texts), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        st.encode_document(texts, convert_to_tensor=True), ours.encode_targets(texts), atol=1e-4, rtol=0
    )
    # Images and image + text go through the chat template the export writes.
    images = [digit_images[0], {"text": "which digit is this?", "image": digit_images[1]}]
    torch.testing.assert_close(
        st.encode_query(images, convert_to_tensor=True), ours.encode_queries(images), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        st.encode_document(images, convert_to_tensor=True), ours.encode_targets(images), atol=1e-4, rtol=0
    )
    assert "SentenceTransformer(" in (out / "README.md").read_text()
    # Each training task's query instruction is a named prompt.
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["digits-i2t"] == I2T + "\n" and "digits-i2t-document" not in prompts  # no target one
    torch.testing.assert_close(
        st.encode_query(images, prompt_name="digits-i2t", convert_to_tensor=True),
        ours.encode_queries(images, task="digits-i2t"),
        atol=1e-4,
        rtol=0,
    )


def test_sentence_transformers_export_refuses_unsupported_pooling(tiny_qwen2_vl_dir, tmp_path):
    src = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, pooling="eos").save_pretrained(tmp_path / "eos")
    with pytest.raises(ExportError, match="pooling 'eos'"):
        export_model(src, tmp_path / "out", format="sentence-transformers")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_non_finite_weights_are_refused_by_name(tiny_qwen2_vl_dir, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    with torch.no_grad():
        model.backbone.language_model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    src = model.save_pretrained(tmp_path / "nan")
    with pytest.raises(ExportError, match=r"language_model\.layers\.1\.mlp\.up_proj\.weight"):
        export_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_fp16_overflow_is_refused_and_leaves_nothing(tiny_qwen2_vl_dir, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    with torch.no_grad():
        model.backbone.language_model.layers[0].self_attn.q_proj.weight[0, 0] = 1e6  # > fp16 max
    src = model.save_pretrained(tmp_path / "big")
    with pytest.raises(
        ExportError, match=r"cast to fp16: tensor 'language_model\.layers\.0\.self_attn\.q_proj"
    ):
        export_model(src, tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_failed_verification_leaves_nothing(runs, tmp_path, monkeypatch):
    import vlm2emb.export as export_module

    # A tolerance no reload can meet: the export must fail and clean up after itself.
    monkeypatch.setattr(export_module, "FP32_MAX_ABS", -1.0)
    with pytest.raises(ExportError, match="verification failed"):
        export_model(runs["lora"] / "final", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_verification_image_is_deterministic():
    import numpy as np

    a, b = np.asarray(verification_image()), np.asarray(verification_image())
    assert a.shape == (48, 48, 3) and np.array_equal(a, b) and len(np.unique(a.reshape(-1, 3), axis=0)) > 100


# --------------------------------------------------------------------- CLI
def test_cli_export_of_the_demo_run(runs, items, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(runs["lora"] / "final"), str(out), "--merge-lora"]) == 0
    assert "verified" in capsys.readouterr().out
    expected = _source(runs["lora"] / "final").encode_queries(items)
    torch.testing.assert_close(
        EmbeddingModel.from_pretrained(out).encode_queries(items), expected, atol=1e-4, rtol=0
    )
    # A second export into the same folder is refused unless --overwrite.
    assert main(["export", str(runs["lora"] / "final"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(runs["lora"] / "final"), str(out), "--overwrite", "--adapter-only"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["export", "no/such/run/final", "OUT"], "checkpoint not found: no/such/run/final"),
        (["export", "FULL", "OUT", "--adapter-only"], "needs a LoRA/DoRA checkpoint"),
        (["export", "FULL", "OUT", "--max-shard-size", "lots"], "--max-shard-size: 'lots'"),
    ],
)
def test_cli_export_user_errors(runs, tmp_path, capsys, argv, message):
    argv = [a.replace("FULL", str(runs["full"] / "final")).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm2emb: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_example_load_export_reproduces_vlm2emb(runs, digit_images, tmp_path):
    import runpy

    out = export_model(runs["lora"] / "final", tmp_path / "ex").out_dir
    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "load_export.py"))
    backbone, processor, config = example["load"](out)
    texts, images = (
        ["a handwritten digit seven", None, "which digit?"],
        [None, digit_images[0], digit_images[1]],
    )
    got = example["embed"](backbone, processor, config, texts, images, config["query_instruction"])
    ours = EmbeddingModel.from_pretrained(out)
    items = ["a handwritten digit seven", digit_images[0], {"text": "which digit?", "image": digit_images[1]}]
    torch.testing.assert_close(got, ours.encode_queries(items), atol=1e-4, rtol=0)
    # The example reads a task's training instructions from the export, as vlm2emb does.
    query, target = example["instructions_for"](config, "digits-t2i")
    assert (query, target) == (T2I, None)
    assert example["instructions_for"](config, None) == (I2T, None)  # the first task
    got = example["embed"](backbone, processor, config, texts, images, query)
    torch.testing.assert_close(got, ours.encode_queries(items, task="digits-t2i"), atol=1e-4, rtol=0)


def test_cli_export_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--adapter-only" in out and "--max-shard-size" in out and "sentence-transformers" in out


def test_training_summary_sums_resumed_segments(tmp_path):
    """elapsed_s restarts on resume: the time is the sum of each segment's last value."""
    from vlm2emb.export import training_summary

    records = [
        {"step": 10, "loss": 2.0, "accuracy": 0.5, "elapsed_s": 5.0},
        {"step": 20, "loss": 1.5, "accuracy": 0.6, "elapsed_s": 10.0},  # killed, resumed at 20
        {"step": 20, "eval": {"hit@1": 0.5}},
        {"step": 30, "loss": 1.0, "accuracy": 0.7, "elapsed_s": 4.0},
        {"step": 40, "loss": 0.5, "accuracy": 0.8, "elapsed_s": 8.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5')
    summary = training_summary(tmp_path, {"step": 40, "steps_per_epoch": 16})
    assert summary == {
        "steps": 40,
        "epochs": 2.5,
        "final_loss": 0.5,
        "final_accuracy": 0.8,
        "train_seconds": 18.5,
        "resumes": 1,
    }
    # An intermediate checkpoint's summary stops at its step.
    early = training_summary(tmp_path, {"step": 30})
    assert early["final_loss"] == 1.0 and early["train_seconds"] == 14.0 and early["epochs"] is None
