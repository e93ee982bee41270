"""What a small study needs, shared by ``odm-demo`` and the study scripts (``scripts/mini_study.py``,
``scripts/deploy_study.py``).

* :mod:`.runner`: a stage is one ``odm-train`` run in a subprocess, skipped when its checkpoint exists, resumed
  when it was interrupted, refused when its settings changed; its results come from the record
  (:mod:`.train_record`) the run writes beside its log.
* :mod:`.options`: the BasicSR options of a training run (the demo's recipe).
* :mod:`.data`: a folder of HR images made into HR / LR pairs for BasicSR's ``PairedImageDataset``.
* :mod:`.results`: the result files (JSON, Markdown) and the machine they came from.
* :mod:`.argtypes`: ``argparse`` types of the study command lines.

Scoring the trained networks is :mod:`odm_basicsr.scoring`, as for ``odm-eval``.
"""
