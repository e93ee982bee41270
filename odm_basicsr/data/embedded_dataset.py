"""A download-free default SR dataset cut from the photos that ship inside the scikit-image wheel.

``EmbeddedSRDataset`` makes HR/LR pairs on the fly (once per dataset instance) from ``skimage.data`` photos, with the
same MATLAB-compatible bicubic degradation as the standard SR benchmarks, so that a first training run works without
downloading DIV2K. It is a smoke-test / demo dataset: a handful of photos is far too little data to train a network
that generalises.
"""
import numbers

import numpy as np
import skimage.data
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import img2tensor
from basicsr.utils.logger import get_root_logger
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data


def _load_stereo_motorcycle():
    return skimage.data.stereo_motorcycle()[0]  # left view only: the right view is a near-duplicate of it


# Every photo below is a file inside the scikit-image wheel (skimage/data/*.png|jpg): loading it needs neither pooch
# nor network (checked with scikit-image 0.26 and networking disabled). Names are the ``skimage.data`` function names.
_COLOUR_PHOTOS = {
    'astronaut': skimage.data.astronaut,  # 512x512
    'chelsea': skimage.data.chelsea,  # 300x451
    'coffee': skimage.data.coffee,  # 400x600
    'hubble_deep_field': skimage.data.hubble_deep_field,  # 872x1000
    'immunohistochemistry': skimage.data.immunohistochemistry,  # 512x512
    'retina': skimage.data.retina,  # 1411x1411, large smooth areas and a black border: not in the default splits
    'rocket': skimage.data.rocket,  # 427x640
    'stereo_motorcycle': _load_stereo_motorcycle,  # 500x741
}
# Grayscale photos, replicated to 3 channels; usable only through the ``images`` option.
_GRAY_PHOTOS = {
    'brick': skimage.data.brick,  # 512x512
    'camera': skimage.data.camera,  # 512x512
    'coins': skimage.data.coins,  # 303x384
    'grass': skimage.data.grass,  # 512x512
    'gravel': skimage.data.gravel,  # 512x512
    'moon': skimage.data.moon,  # 512x512
}
_LOADERS = {**_COLOUR_PHOTOS, **_GRAY_PHOTOS}

# The fixed, disjoint partition. Never change it silently: validation numbers depend on it.
_SPLITS = {
    'train': ('astronaut', 'coffee', 'hubble_deep_field', 'immunohistochemistry', 'stereo_motorcycle'),
    'val': ('chelsea', 'rocket'),
}

# Keys that BasicSR itself reads from (or writes into) a dataset's options.
_BASICSR_KEYS = frozenset({
    'name', 'type', 'phase', 'scale', 'batch_size_per_gpu', 'num_worker_per_gpu', 'dataset_enlarge_ratio',
    'prefetch_mode', 'pin_memory', 'persistent_workers', 'num_prefetch_queue', 'use_shuffle', 'io_backend',
    'gt_size', 'use_hflip', 'use_rot'
})
_OWN_KEYS = frozenset({'split', 'images', 'val_size', 'hr_downscale'})
_ACCEPTED_KEYS = _BASICSR_KEYS | _OWN_KEYS


def embedded_image_names(split):
    """Return the ``skimage.data`` photo names of a split of :class:`EmbeddedSRDataset`.

    Args:
        split (str): ``'train'`` or ``'val'`` (the fixed, disjoint default partition), or ``'all'`` for every name
            that the ``images`` option accepts.

    Returns:
        list[str]: The names, in dataset order.
    """
    if split == 'all':
        return sorted(_LOADERS)
    if split not in _SPLITS:
        raise ValueError(f"Unknown split {split!r}. Valid splits: 'train', 'val' (and 'all' for this function).")
    return list(_SPLITS[split])


def _to_float_rgb(img):
    """uint8/bool HxW or HxWxC photo -> float32 HxWx3 RGB in [0, 1]."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        raise TypeError(f'Expected an 8-bit photo, got {img.dtype}.')
    return img.astype(np.float32) / 255.


def _quantize_8bit(img):
    """Round a float [0, 1] image to the values an 8-bit PNG can hold (as a saved image would be)."""
    return (np.clip(np.round(img * 255.), 0, 255) / 255.).astype(np.float32)


def _bicubic_down(img, factor):
    """MATLAB-compatible bicubic (with antialiasing) downscale of a float HWC image, rounded to 8 bit."""
    return _quantize_8bit(imresize(img, 1. / factor))


@DATASET_REGISTRY.register()
class EmbeddedSRDataset(data.Dataset):
    """Paired SR dataset made from the colour photos bundled with scikit-image (no download).

    Same contract as ``basicsr.data.paired_image_dataset.PairedImageDataset``: items are dicts with ``lq`` and ``gt``
    (CHW float32 RGB tensors in [0, 1], ``gt`` ``scale`` times larger) and ``lq_path``/``gt_path``. The paths are not
    files; they read ``'skimage/<name>.png'`` so that BasicSR's validation names saved images after the photo.

    HR = the photo (optionally shrunk by ``hr_downscale``) cropped at the bottom/right to a multiple of ``scale``;
    LR = ``basicsr.utils.matlab_functions.imresize(HR, 1 / scale)`` rounded to 8 bit, as a real LR PNG would be.
    Pairs are computed once, for the whole photos, when the dataset is built (well under a second) and kept in memory.
    Patches (train) and validation windows are cut from the whole LR image at positions aligned with the HR crop, so
    an LR patch has no border artefacts of its own.

    Default partition (fixed; validation is on held-out photos):

    * ``train``: astronaut (512x512), coffee (400x600), hubble_deep_field (872x1000), immunohistochemistry (512x512),
      stereo_motorcycle (left view, 500x741).
    * ``val``: chelsea (300x451), rocket (427x640).

    Further names accepted by ``images``: retina (1411x1411) and the grayscale photos brick, camera, coins, grass,
    gravel, moon (replicated to 3 channels). See :func:`embedded_image_names`.

    With only five training photos, ``len(dataset)`` is 5 in the train phase; BasicSR's ``dataset_enlarge_ratio``
    multiplies it through the sampler, and BasicSR's train loader drops incomplete batches, so set
    ``dataset_enlarge_ratio`` large (e.g. 1000) or an epoch may contain no batch at all.

    Args:
        opt (dict): Config for the dataset. Besides BasicSR's loader keys (``name``, ``type``, ``batch_size_per_gpu``,
            ``num_worker_per_gpu``, ``dataset_enlarge_ratio``, ``prefetch_mode``, ``pin_memory``,
            ``persistent_workers``, ``num_prefetch_queue``, ``use_shuffle``, ``io_backend`` — the last is accepted
            and ignored), it reads:

            phase (str): ``'train'`` for random patches, ``'val'`` or ``'test'`` for one centre window per photo.
                Set by BasicSR's option parser.
            scale (int): Upscaling factor. Set by BasicSR's option parser from the top-level ``scale``.
            split (str): ``'train'`` or ``'val'``, the photos to use. Default: ``'train'`` in the train phase,
                else ``'val'``.
            images (list[str] | None): Explicit ``skimage.data`` names; when given, ``split`` is ignored.
                Default: None.
            gt_size (int): Train phase: HR patch size, a multiple of ``scale``. Default: 96.
            use_hflip (bool): Train phase: random horizontal flips. Default: True.
            use_rot (bool): Train phase: random vertical flips and 90-degree rotations. Default: True.
            val_size (int | None): Val/test phase: centre-crop HR to at most this size (rounded down to a multiple
                of ``scale``) so that validation on CPU is fast; None or 0 keeps whole photos. Default: 96.
            hr_downscale (float): Shrink each photo by this factor (MATLAB bicubic, rounded to 8 bit) before cutting
                pairs, to get more content per patch. Must be >= 1. Default: 1.

    Raises:
        ValueError: For an option key not listed above, an unknown split or photo name, or invalid values.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        unknown = sorted(set(opt) - _ACCEPTED_KEYS)
        if unknown:
            raise ValueError(f'EmbeddedSRDataset: unknown option key(s) {unknown}. '
                             f'Accepted keys: {sorted(_ACCEPTED_KEYS)}.')

        self.phase = opt.get('phase')
        if self.phase not in ('train', 'val', 'test'):
            raise ValueError(f"EmbeddedSRDataset: phase must be 'train', 'val' or 'test', got {self.phase!r}.")
        self.scale = opt.get('scale')
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Integral) or self.scale < 1:
            raise ValueError(f'EmbeddedSRDataset: scale must be a positive int (BasicSR copies the top-level `scale` '
                             f'into each dataset), got {self.scale!r}.')
        self.scale = int(self.scale)

        self.hr_downscale = opt.get('hr_downscale', 1)
        if (isinstance(self.hr_downscale, bool) or not isinstance(self.hr_downscale, numbers.Real)
                or not self.hr_downscale >= 1):
            raise ValueError(f'EmbeddedSRDataset: hr_downscale must be a number >= 1, got {self.hr_downscale!r}.')

        self.image_names = self._resolve_names(opt)

        self.gt_size = opt.get('gt_size', 96)
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_rot = bool(opt.get('use_rot', True))
        self.val_size = opt.get('val_size', 96)
        if self.phase == 'train':
            if (isinstance(self.gt_size, bool) or not isinstance(self.gt_size, numbers.Integral) or self.gt_size < 1
                    or self.gt_size % self.scale):
                raise ValueError(f'EmbeddedSRDataset: gt_size must be a positive multiple of scale={self.scale}, '
                                 f'got {self.gt_size!r}.')
        elif self.val_size is not None and (isinstance(self.val_size, bool)
                                            or not isinstance(self.val_size, numbers.Integral) or self.val_size < 0
                                            or 0 < self.val_size < self.scale):
            raise ValueError(f'EmbeddedSRDataset: val_size must be None, 0 or an int >= scale={self.scale}, '
                             f'got {self.val_size!r}.')

        self._pairs = [self._make_pair(name) for name in self.image_names]

        if self.phase == 'train':
            for name, (hr, _) in zip(self.image_names, self._pairs):
                if min(hr.shape[:2]) < self.gt_size:
                    raise ValueError(f'EmbeddedSRDataset: gt_size={self.gt_size} exceeds photo {name!r} '
                                     f'(HR {hr.shape[0]}x{hr.shape[1]} after hr_downscale={self.hr_downscale}).')
            enlarged = len(self._pairs) * opt.get('dataset_enlarge_ratio', 1)
            batch = opt.get('batch_size_per_gpu')
            if isinstance(batch, numbers.Integral) and enlarged < batch:
                get_root_logger().warning(
                    f'EmbeddedSRDataset has {len(self._pairs)} photos x dataset_enlarge_ratio='
                    f'{opt.get("dataset_enlarge_ratio", 1)} < batch_size_per_gpu={batch}: BasicSR drops incomplete '
                    f'batches, so epochs will be empty. Raise dataset_enlarge_ratio (e.g. 1000).')

    @staticmethod
    def _resolve_names(opt):
        images = opt.get('images')
        if images is not None:
            if isinstance(images, str):
                images = [images]
            images = list(images)
            if not images:
                raise ValueError('EmbeddedSRDataset: `images` is empty.')
            bad = [n for n in images if n not in _LOADERS]
            if bad:
                raise ValueError(f'EmbeddedSRDataset: unknown image name(s) {bad}. '
                                 f'Valid names: {sorted(_LOADERS)}.')
            if len(set(images)) != len(images):
                raise ValueError(f'EmbeddedSRDataset: duplicate names in `images` {images} '
                                 f'(validation would overwrite its saved images).')
            return images
        split = opt.get('split', 'train' if opt.get('phase') == 'train' else 'val')
        if split not in _SPLITS:
            raise ValueError(f'EmbeddedSRDataset: unknown split {split!r}. Valid splits: {sorted(_SPLITS)} '
                             f'(train = {list(_SPLITS["train"])}, val = {list(_SPLITS["val"])}).')
        return list(_SPLITS[split])

    def _make_pair(self, name):
        hr = _to_float_rgb(_LOADERS[name]())
        if self.hr_downscale != 1:
            hr = _bicubic_down(hr, self.hr_downscale)
        h, w = hr.shape[:2]
        hr = np.ascontiguousarray(hr[:h - h % self.scale, :w - w % self.scale])
        if hr.shape[0] == 0 or hr.shape[1] == 0:
            raise ValueError(f'EmbeddedSRDataset: photo {name!r} is smaller than scale={self.scale} after '
                             f'hr_downscale={self.hr_downscale}.')
        lr = _bicubic_down(hr, self.scale) if self.scale != 1 else hr.copy()
        assert lr.shape[0] * self.scale == hr.shape[0] and lr.shape[1] * self.scale == hr.shape[1], (hr.shape, lr.shape)
        return hr, lr

    def get_full_pair(self, index):
        """Return copies of the whole HR and LR images (float32 HWC RGB in [0, 1]) of photo ``index``."""
        hr, lr = self._pairs[index]
        return hr.copy(), lr.copy()

    def __getitem__(self, index):
        name = self.image_names[index]
        img_gt, img_lq = self._pairs[index]
        path = f'skimage/{name}.png'
        if self.phase == 'train':
            img_gt, img_lq = paired_random_crop(img_gt, img_lq, self.gt_size, self.scale, path)
            # augment() flips in place (cv2.flip(img, 1, img)): copy so the cached photos are never modified.
            img_gt, img_lq = augment([img_gt.copy(), img_lq.copy()], self.use_hflip, self.use_rot)
        elif self.val_size:
            h_lq, w_lq = img_lq.shape[:2]
            size = self.val_size // self.scale
            ch, cw = min(size, h_lq), min(size, w_lq)
            top, left = (h_lq - ch) // 2, (w_lq - cw) // 2
            img_lq = img_lq[top:top + ch, left:left + cw]
            s = self.scale
            img_gt = img_gt[top * s:(top + ch) * s, left * s:(left + cw) * s]
        # Copies: a tensor must never share memory with the cached photos.
        img_gt, img_lq = img2tensor([np.array(img_gt), np.array(img_lq)], bgr2rgb=False, float32=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': path, 'gt_path': path}

    def __len__(self):
        return len(self._pairs)

    def __repr__(self):
        return (f'{type(self).__name__}(phase={self.phase!r}, scale={self.scale}, images={self.image_names}, '
                f'hr_downscale={self.hr_downscale}, ' + (f'gt_size={self.gt_size})' if self.phase == 'train' else
                                                          f'val_size={self.val_size})'))


__all__ = ['EmbeddedSRDataset', 'embedded_image_names']
