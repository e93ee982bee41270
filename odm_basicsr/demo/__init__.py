"""``odm-demo``: FP EDSR, then plain QAT vs ODM, on the photos bundled with scikit-image (:mod:`.run`).

The parts: :mod:`.cli` (flags and checks), :mod:`.recipe` (settings, networks, datasets, stages), :mod:`.figures`
(side-by-side crops), :mod:`.results` (the table). Running stages and scoring them are shared with the studies:
:mod:`odm_basicsr.study`, :mod:`odm_basicsr.scoring`.
"""
from .cli import parse_args
from .recipe import plan_stages, train_dataset_opt, val_pairs
from .run import main

__all__ = ['main', 'parse_args', 'plan_stages', 'train_dataset_opt', 'val_pairs']
