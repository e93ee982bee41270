"""What a small study needs, shared by ``odm-demo`` and the study scripts (``scripts/mini_study.py``,
``scripts/deploy_study.py``).

* :mod:`.runner`: a stage is one ``odm-train`` run in a subprocess, skipped when its checkpoint exists, resumed
  when it was interrupted, refused when its settings changed; its results come from the record
  (:mod:`.train_record`) the run writes beside its log.
* :mod:`.options`: the BasicSR options of a training run (the demo's recipe), and the study scripts' FP and QAT
  runs with their settings (learning rates, batch, patch, seed, calibration batches).
* :mod:`.data`: a folder of HR images made into HR / LR pairs for BasicSR's ``PairedImageDataset``; the benchmark
  sets of the study scripts.
* :mod:`.results`: the result files (JSON, Markdown) and the machine they came from; mean and std over seeds.
* :mod:`.argtypes`: ``argparse`` types and checks of the study command lines.

Scoring the trained networks is :mod:`odm_basicsr.scoring`, as for ``odm-eval``.
"""
