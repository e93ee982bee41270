"""``odm-demo``: FP EDSR, then plain QAT vs ODM, on the photos bundled with scikit-image (:mod:`.run`).

The parts: :mod:`.cli` (flags and checks), :mod:`.recipe` (settings, networks, datasets, stages), :mod:`.figures`
(side-by-side crops), :mod:`.results` (the table). Running stages and scoring them are shared with the studies:
:mod:`odm_basicsr.study`, :mod:`odm_basicsr.scoring`.
"""
from odm_basicsr.scoring import load_network as load_net
from odm_basicsr.scoring import sr_images
from odm_basicsr.study.argtypes import bit_width as _bit_width
from odm_basicsr.study.argtypes import positive_int as _positive_int
from odm_basicsr.study.data import hr_images as _hr_images
from odm_basicsr.study.data import prepare_paired_data
from odm_basicsr.study.results import fmt_time as _fmt_time
from odm_basicsr.study.results import load_average as _load_average
from odm_basicsr.study.results import machine_info
from odm_basicsr.study.runner import Stage, run_stage
from odm_basicsr.study.runner import load_json as _load_json

from .cli import parse_args
from .recipe import base_options, edsr_arch, plan_stages, train_dataset_opt, val_pairs
from .run import main

# The names imported from odm_basicsr.scoring and odm_basicsr.study are what scripts/deploy_study.py took from the
# demo before those modules held them; new code imports them from there.
__all__ = ['Stage', '_bit_width', '_fmt_time', '_hr_images', '_load_average', '_load_json', '_positive_int',
           'base_options', 'edsr_arch', 'load_net', 'machine_info', 'main', 'parse_args', 'plan_stages',
           'prepare_paired_data', 'run_stage', 'sr_images', 'train_dataset_opt', 'val_pairs']
