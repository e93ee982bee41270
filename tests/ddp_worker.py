"""Run under torchrun by tests/test_distributed.py: a few ODMModel steps on two CPU ranks (gloo), then check
that every rank holds the same parameters and buffers. Not a test module itself."""
# ruff: noqa: I001  (odm_basicsr must be imported before basicsr)
import sys

import torch
import torch.distributed as dist

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)
from basicsr.utils import set_random_seed
from basicsr.utils.dist_util import init_dist
from odm_basicsr.models.odm_model import ODMModel
from odm_helpers import odm_opt


def run_mode(mode):
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = odm_opt(mode, weight=1e-3, offsets={'fraction': 0.5} if mode != 'off' else None)
    opt.update(dist=True, rank=rank, world_size=world)
    set_random_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = ODMModel(opt)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for it in range(1, 4):
        model.feed_data({'lq': torch.rand(2, 3, 8, 8, generator=g), 'gt': torch.rand(2, 3, 16, 16, generator=g)})
        model.optimize_parameters(it)
    bare = model.get_bare_model(model.net_g)
    flat = torch.cat([t.detach().float().flatten() for t in list(bare.parameters()) + list(bare.buffers())])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(gathered[0], other) for other in gathered[1:])
        print(f'RANKS_IDENTICAL={same} mode={mode} n={flat.numel()} coop={model.log_dict.get("coop")}', flush=True)
    dist.barrier()


if __name__ == '__main__':
    init_dist('pytorch')  # the plugin's patched launcher: gloo without CUDA
    for mode in sys.argv[1:]:
        run_mode(mode)
    dist.destroy_process_group()
