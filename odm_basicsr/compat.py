"""Make BasicSR 1.4.2 work with current software. Applied by ``import odm_basicsr``, before BasicSR is imported.

What it changes (each item is a trap of BASICSR_NOTES.md):

1. ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17, imported by basicsr) is provided as
   a small stand-in module, so ``import basicsr`` works.
2. Resume works without a GPU: ``basicsr.train.load_resume_state`` loads the ``.state`` file on the CPU (the
   optimizer moves its state to the parameters' device) with ``weights_only=True``.
3. EMA: ``BaseModel.model_ema`` also copies buffers (quantizer flags and scales, BatchNorm statistics) into
   ``net_g_ema``, and starts the average of a quantizer range from its current value when the quantizer was
   initialised after the EMA copy was made.
4. Checkpoints: networks and training states are written atomically (temporary file + rename) and loaded with
   ``weights_only=True``. Loading a network reports quantizer entries that an FP checkpoint lacks as expected;
   any other mismatch with ``strict_load_g: true`` is an error naming the file and the keys. A network or
   training state holding a NaN / Inf tensor is never written (``odm_basicsr.guards.NonFiniteError`` names the
   file not written and the keys; a file already there stays as it was), nor loaded as a network, pretrained
   network or resume state.
5. Distributed training on CPU: the ``pytorch`` launcher falls back to the ``gloo`` backend when CUDA is absent,
   and DDP wraps CPU models without ``device_ids``.
6. ``optim_g.type`` accepts Adam, AdamW, Adamax, SGD, RMSprop (1.4.2 only knows Adam).
7. Exact resume: training states also hold the random-number-generator states (Python, NumPy, torch), and a
   resumed run skips the batches of the current epoch that were already used, so that resuming gives the same
   weights as an uninterrupted run (exact on the CPU with ``num_worker_per_gpu: 0``; data-loading workers reseed
   themselves at each epoch start, so with workers the augmentations after a resume differ).
"""
import itertools
import os
import random
import sys
import types

import numpy as np
import torch

from odm_basicsr.checkpoint import atomic_save, load_checkpoint, load_weights, select_state_dict  # noqa: F401
from odm_basicsr.guards import check_finite

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
atomic_torch_save = atomic_save


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
        check_finite(resume_state, f'training state {resume_state_path}', 'refusing to resume from it')
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


_KEPT = 'nothing was written (a file already there is left as it was)'


def _patch_base_model():
    from basicsr.models.base_model import BaseModel
    from basicsr.utils import get_root_logger
    from basicsr.utils.dist_util import master_only
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    from odm_basicsr.quant import ActQuantizer
    from odm_basicsr.quant.offsets import ensure_offsets_like

    def model_ema(self, decay=0.999):
        """EMA of parameters, plus a copy of every buffer (BasicSR 1.4.2 averages parameters only)."""
        from odm_basicsr.quant.offsets import DistributionOffset

        net_g = self.get_bare_model(self.net_g)
        src_modules = dict(net_g.named_modules())
        # offsets attached to net_g (at ODM calibration) appear in net_g_ema too, starting at net_g's values
        fresh = [f'{name}.offset.' for name in ensure_offsets_like(self.net_g_ema, net_g)]
        # quantizers initialised in net_g after net_g_ema was copied: their average starts now (the flags are read
        # from their Python mirrors: no host sync per quantizer per EMA step)
        ema_quantizers = [(name, q) for name, q in self.net_g_ema.named_modules() if isinstance(q, ActQuantizer)]
        for name, q in ema_quantizers:
            if not q.is_initialized and src_modules[name].is_initialized:
                fresh.append(f'{name}.')
        src_params = dict(net_g.named_parameters())
        src_buffers = dict(net_g.named_buffers())
        with torch.no_grad():
            for k, p in self.net_g_ema.named_parameters():
                if any(k.startswith(f) for f in fresh):
                    p.copy_(src_params[k])
                else:
                    p.mul_(decay).add_(src_params[k], alpha=1 - decay)
            for k, b in self.net_g_ema.named_buffers():
                b.copy_(src_buffers[k])
            for name, q in ema_quantizers:  # the buffers were copied: their Python mirrors follow
                q.set_initialized(src_modules[name].is_initialized)
            for name, off in self.net_g_ema.named_modules():
                if isinstance(off, DistributionOffset):
                    off.set_folded(src_modules[name].is_folded)

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's save_network, written atomically; refused (nothing written) for a non-finite network."""
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
        check_finite(save_dict, f'not writing {save_path}: the network', _KEPT)
        atomic_torch_save(save_dict, save_path)

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's save_training_state, written atomically (after the network file it refers to).

        Refused (nothing written) when the optimizer state holds a non-finite value.
        """
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        state['rng'] = rng_state()
        scaler = getattr(self, 'grad_scaler', None)
        if scaler is not None and scaler.is_enabled():
            state['grad_scaler'] = scaler.state_dict()
        save_path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
        check_finite(state, f'not writing {save_path}: the training state', _KEPT)
        atomic_torch_save(state, save_path)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load ``param_key`` of ``load_path`` into ``net``.

        Quantizer entries that the checkpoint lacks (an FP checkpoint) are expected; with ``strict`` every
        other missing, unexpected or differently shaped key is an error. A state with NaN / Inf values is refused
        (``NonFiniteError``).
        """
        logger = get_root_logger()
        net = self.get_bare_model(net)
        name = type(net).__name__
        loaded = load_weights(net, load_path, param_key, fallback=None if param_key is None else 'params',
                              strict=strict, finite='refusing to load it',
                              hint='Is it a checkpoint of another network? Set path.strict_load_g: false to load '
                                   'the matching part only.')
        key, fit = loaded.key, loaded.fit
        if key != param_key and key is not None:
            logger.info(f'Loading: {param_key} does not exist in {load_path}, use {key}.')
        for k, (own, theirs) in fit.shapes.items():
            logger.warning(f'Size different, ignore [{k}]: net {own}; ckpt {theirs}')
        if fit.missing or fit.unexpected:
            logger.warning(f'Loading {load_path} non-strictly: {len(fit.missing)} keys missing, '
                           f'{len(fit.unexpected)} unexpected: {(fit.missing + fit.unexpected)[:8]}')
        if fit.quantizer_missing:
            logger.info(f'{len(fit.quantizer_missing)} quantizer entries are not in {load_path} (an FP checkpoint): '
                        'the quantizers will be initialised from data.')
        logger.info(f'Loaded {name} from {load_path} [{key}].')

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

    BaseModel.model_ema = model_ema
    BaseModel.save_network = save_network
    BaseModel.save_training_state = save_training_state
    BaseModel.load_network = load_network
    BaseModel.model_to_device = model_to_device
    original_resume = BaseModel.resume_training

    def resume_training(self, resume_state):
        """BasicSR's resume_training, plus the RNG states saved with the training state."""
        original_resume(self, resume_state)
        if 'rng' in resume_state:
            set_rng_state(resume_state['rng'])
        scaler = getattr(self, 'grad_scaler', None)
        if scaler is not None and scaler.is_enabled() and 'grad_scaler' in resume_state:
            scaler.load_state_dict(resume_state['grad_scaler'])

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
