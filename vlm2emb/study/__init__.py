"""The seed study in one command: the same recipe on autoregressive and diffusion backbones.

``vlm2emb study STUDY.yaml`` (or :func:`run_study`) trains one recipe per backbone and seed,
evaluates every run on a suite per meta-task, runs the data-efficiency curve of each
(:mod:`vlm2emb.train.data_efficiency`), analyses the embedding space
(:mod:`vlm2emb.eval.analysis`) and writes ``results.json``, ``summary.md`` and the figures
(docs/study.md). Importing this package imports neither torch nor matplotlib.
"""

from vlm2emb.study.config import BACKBONE_KINDS, StudyBackbone, StudyConfig, load_study
from vlm2emb.study.run import run_study

__all__ = ["BACKBONE_KINDS", "StudyBackbone", "StudyConfig", "load_study", "run_study"]
