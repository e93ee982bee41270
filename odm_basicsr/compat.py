"""BasicSR 1.4.2's genuine bugs, fixed before BasicSR is used (applied by the plugin's subpackages and entry points).

Only bugs are patched here; what the plugin wants from a model (quantizer-aware checkpoints, NaN / Inf guards, EMA of
quantizer state, the float16 gradient scaler) lives in its own model classes, ``QuantSRModel`` and ``ODMModel``.

Each fix: what BasicSR 1.4.2 does -> what it does here (the test that shows it).

1. ``import basicsr`` fails on torchvision >= 0.17 (``functional_tensor`` removed) -> a stand-in module
   (``test_compat.py::test_basicsr_imports_on_current_torchvision``).
2. Resume crashes without a GPU (``torch.cuda.current_device()``) -> the state loads on the CPU, weights only
   (``test_training_cli.py::test_auto_resume_on_cpu``).
3. Resume restarts the epoch's data and reseeds nothing -> the training state holds the RNG states and the sampler
   skips the batches already used
   (``test_training_cli.py::test_resume_gives_the_same_weights_as_an_uninterrupted_run``).
4. EMA averages parameters only, ``net_g_ema``'s buffers keep their initial values -> buffers copied
   (``test_compat.py::test_ema_copies_buffers_for_every_model``).
5. ``torch.save`` straight onto the target, so a crash mid-write destroys the last checkpoint -> temporary file and
   rename (``test_compat.py::test_saves_are_atomic_for_every_model_and_nan_guards_are_the_plugins``,
   ``test_checkpoint.py::test_atomic_save_keeps_the_old_file_when_writing_fails``).
6. Distributed training assumes CUDA (NCCL, ``device_ids``) -> gloo and DDP on the CPU
   (``test_distributed.py::test_odm_train_with_pytorch_launcher``).
7. ``optim_g.type`` accepts only ``Adam`` (BasicSR's master has more) -> also AdamW, Adamax, SGD, RMSprop
   (``test_compat.py::test_optimizers_beyond_adam``).
8. The test pipeline needs ``val.suffix`` (KeyError) -> set to ``~`` when absent, in ``odm_basicsr.cli``
   (``test_training_cli.py::test_odm_test_evaluates_the_trained_checkpoint``).

Two hooks carry the plugin's policies without patching them in: ``BaseModel.check_before_writing(state, path, what)``
(a no-op; ``QuantSRModel`` refuses NaN / Inf there) and ``BaseModel.training_state(epoch, iter)`` (BasicSR's
training-state dict plus the RNG states; ``ODMModel`` adds its gradient scaler). Exact resume is exact on the CPU with
``num_worker_per_gpu: 0``; data-loading workers reseed themselves at each epoch start.
"""
import itertools
import os
import random
import sys
import types

import numpy as np
import torch

from odm_basicsr.checkpoint import atomic_save, load_checkpoint

_APPLIED = False
_RESUMED = {}  # iteration and epoch of the state that load_resume_state returned


def rng_state():
    """Python, NumPy and torch RNG states as weights-only-safe values (tensors, ints, tuples)."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:]))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _plain(v):
    return v.item() if hasattr(v, 'item') else v


def set_rng_state(state):
    random.setstate(_as_tuple(state['python']))
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def install_functional_tensor_stub():
    """Provide ``torchvision.transforms.functional_tensor`` where torchvision no longer has it."""
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (torchvision < 0.17)
    except ImportError:
        from torchvision.transforms import functional
        stub = types.ModuleType(name)
        stub.rgb_to_grayscale = functional.rgb_to_grayscale
        sys.modules[name] = stub


# Checkpoint reading and writing live in odm_basicsr.checkpoint; these names stay for code that imports them here.


def _patch_resume():
    import basicsr.train
    from basicsr.utils import check_resume, scandir

    def load_resume_state(opt):
        """BasicSR's resume-state loader, loading on the CPU so that it works without a GPU."""
        resume_state_path = None
        if opt['auto_resume']:
            state_path = os.path.join('experiments', opt['name'], 'training_states')
            if os.path.isdir(state_path):
                states = list(scandir(state_path, suffix='state', recursive=False, full_path=False))
                if states:
                    latest = max(float(v.split('.state')[0]) for v in states)
                    resume_state_path = os.path.join(state_path, f'{latest:.0f}.state')
                    opt['path']['resume_state'] = resume_state_path
        elif opt['path'].get('resume_state'):
            resume_state_path = opt['path']['resume_state']
        if resume_state_path is None:
            return None
        resume_state = load_checkpoint(resume_state_path)
        check_resume(opt, resume_state['iter'])
        _RESUMED.update(iter=resume_state['iter'], epoch=resume_state['epoch'])
        return resume_state

    original_create = basicsr.train.create_train_val_dataloader

    def create_train_val_dataloader(opt, logger):
        """BasicSR's loaders; after a resume the sampler skips the batches of this epoch already used."""
        result = original_create(opt, logger)
        train_loader, train_sampler = result[0], result[1]
        if _RESUMED and train_sampler is not None:
            per_epoch = len(train_loader)
            used = _RESUMED['iter'] - _RESUMED['epoch'] * per_epoch
            if 0 < used <= per_epoch:
                train_sampler.skip_samples = used * train_loader.batch_size
        _RESUMED.clear()
        return result

    basicsr.train.load_resume_state = load_resume_state
    basicsr.train.create_train_val_dataloader = create_train_val_dataloader


def _patch_sampler():
    from basicsr.data.data_sampler import EnlargedSampler

    original_iter = EnlargedSampler.__iter__

    def __iter__(self):
        skip, self.skip_samples = getattr(self, 'skip_samples', 0), 0
        return itertools.islice(original_iter(self), skip, None)

    EnlargedSampler.__iter__ = __iter__




def _patch_base_model():
    from basicsr.models.base_model import BaseModel
    from basicsr.utils.dist_util import master_only
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    def model_ema(self, decay=0.999):
        """EMA of the parameters, plus a copy of every buffer (BasicSR 1.4.2 averages parameters only, so BatchNorm
        statistics and quantizer state of ``net_g_ema`` stayed at their initial values)."""
        net_g = self.get_bare_model(self.net_g)
        params, buffers = dict(net_g.named_parameters()), dict(net_g.named_buffers())
        with torch.no_grad():
            for k, p in self.net_g_ema.named_parameters():
                p.mul_(decay).add_(params[k], alpha=1 - decay)
            for k, b in self.net_g_ema.named_buffers():
                b.copy_(buffers[k])

    def check_before_writing(self, state, path, what):
        """Called with every network and training state before it is written; a plugin model refuses here."""

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's save_network, written atomically (a temporary file renamed over the target)."""
        current_iter = 'latest' if current_iter == -1 else current_iter
        save_path = os.path.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth')
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError('The lengths of net and param_key should be the same.')
        save_dict = {}
        for net_, key in zip(nets, keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = {k[7:] if k.startswith('module.') else k: v.cpu() for k, v in state_dict.items()}
        self.check_before_writing(save_dict, save_path, 'the network')
        atomic_save(save_dict, save_path)

    def training_state(self, epoch, current_iter):
        """BasicSR's training state (epoch, iteration, optimizers, schedulers) plus the RNG states."""
        return {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                'schedulers': [s.state_dict() for s in self.schedulers], 'rng': rng_state()}

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's save_training_state with the RNG states, written atomically (after the network file)."""
        if current_iter == -1:
            return
        save_path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
        state = self.training_state(epoch, current_iter)
        self.check_before_writing(state, save_path, 'the training state')
        atomic_save(state, save_path)

    def model_to_device(self, net):
        """Move to the device; wrap with DDP (also on CPU, for the gloo backend) or DataParallel."""
        net = net.to(self.device)
        if self.opt['dist']:
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(
                net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    optimizers = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'Adamax': torch.optim.Adamax,
                  'SGD': torch.optim.SGD, 'RMSprop': torch.optim.RMSprop}

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        if optim_type not in optimizers:
            raise NotImplementedError(f'optimizer {optim_type} is not supported; use one of {list(optimizers)}')
        return optimizers[optim_type](params, lr, **kwargs)

    original_resume = BaseModel.resume_training

    def resume_training(self, resume_state):
        """BasicSR's resume_training, plus the RNG states saved with the training state."""
        original_resume(self, resume_state)
        if 'rng' in resume_state:
            set_rng_state(resume_state['rng'])

    BaseModel.model_ema = model_ema
    BaseModel.check_before_writing = check_before_writing
    BaseModel.save_network = save_network
    BaseModel.training_state = training_state
    BaseModel.save_training_state = save_training_state
    BaseModel.model_to_device = model_to_device
    BaseModel.get_optimizer = get_optimizer
    BaseModel.resume_training = resume_training


def _patch_distributed():
    import basicsr.utils.dist_util as dist_util
    import torch.distributed as dist

    def _init_dist_pytorch(backend, **kwargs):
        """torchrun / torch.distributed launcher: NCCL on GPUs, gloo where CUDA is absent."""
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ['RANK']) % torch.cuda.device_count())
        else:
            backend = 'gloo'
        dist.init_process_group(backend=backend, **kwargs)

    dist_util._init_dist_pytorch = _init_dist_pytorch


def apply_compat():
    """Apply every fix above once. Safe to call again."""
    global _APPLIED
    if _APPLIED:
        return
    install_functional_tensor_stub()
    import warnings
    with warnings.catch_warnings():  # scipy.ndimage.filters, torchvision deprecations inside basicsr
        warnings.simplefilter('ignore', DeprecationWarning)
        import basicsr  # noqa: F401
    _patch_resume()
    _patch_sampler()
    _patch_base_model()
    _patch_distributed()
    _APPLIED = True
