"""ODM training math in plain PyTorch (no BasicSR import): gradient cooperation (METHOD.md 4.2)."""
from odm_basicsr.odm.cooperation import (
    COOPERATION_MODES,
    FeatureGate,
    all_reduce_mean_,
    coop_agree,
    cooperative_feature,
    cosine_combine,
    gate_param_grads,
    gate_stats,
    sign_gate,
)

__all__ = [
    'COOPERATION_MODES',
    'FeatureGate',
    'all_reduce_mean_',
    'coop_agree',
    'cooperative_feature',
    'cosine_combine',
    'gate_param_grads',
    'gate_stats',
    'sign_gate',
]
