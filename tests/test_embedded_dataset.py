import odm_basicsr.plugin  # noqa: F401, I001  (BasicSR fixes + registration first)

import os.path as osp
import pickle
import random

import numpy as np
import pytest
import skimage.data
import torch
from basicsr.data import build_dataloader, build_dataset
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY

from odm_basicsr.data.embedded_dataset import EmbeddedSRDataset, embedded_image_names


def _make(phase, scale, **kwargs):
    opt = {'name': 'embedded', 'type': 'EmbeddedSRDataset', 'phase': phase, 'scale': scale}
    opt.update(kwargs)
    return EmbeddedSRDataset(opt)


def _bicubic_8bit(hr, scale):
    return np.clip(np.round(imresize(hr, 1 / scale) * 255), 0, 255) / 255


def _check_item(item, lq_hw, scale):
    lq, gt = item['lq'], item['gt']
    assert lq.dtype == torch.float32 and gt.dtype == torch.float32
    assert tuple(lq.shape) == (3, *lq_hw)
    assert tuple(gt.shape) == (3, lq_hw[0] * scale, lq_hw[1] * scale)
    for t in (lq, gt):
        assert 0 <= t.min() and t.max() <= 1
    assert isinstance(item['lq_path'], str) and isinstance(item['gt_path'], str)


def test_registered():
    assert DATASET_REGISTRY.get('EmbeddedSRDataset') is EmbeddedSRDataset


def test_splits_disjoint_and_loadable():
    train, val = embedded_image_names('train'), embedded_image_names('val')
    assert len(train) >= 3 and len(val) >= 1
    assert not set(train) & set(val)
    assert set(train) | set(val) <= set(embedded_image_names('all'))
    # default split follows the phase
    assert _make('train', 4, gt_size=48).image_names == train
    assert _make('val', 4).image_names == val
    assert _make('test', 4).image_names == val
    with pytest.raises(ValueError, match='nope'):
        embedded_image_names('nope')


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_train_shapes(scale):
    gt_size = 12 * scale
    ds = _make('train', scale, gt_size=gt_size, use_hflip=True, use_rot=True)
    assert len(ds) == len(embedded_image_names('train'))
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, (gt_size // scale, gt_size // scale), scale)
        assert osp.splitext(osp.basename(item['lq_path']))[0] == ds.image_names[i]


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_val_shapes(scale):
    ds = _make('val', scale)  # val_size defaults to 96, a multiple of 2, 3 and 4
    names = [osp.splitext(osp.basename(ds[i]['lq_path']))[0] for i in range(len(ds))]
    assert names == embedded_image_names('val')
    for i in range(len(ds)):
        _check_item(ds[i], (96 // scale, 96 // scale), scale)
    ds = _make('val', scale, val_size=100)
    _check_item(ds[0], (100 // scale, 100 // scale), scale)


def test_lr_is_matlab_bicubic_of_hr_rounded_to_8bit():
    scale = 3
    ds = _make('val', scale, images=['chelsea'], val_size=None)
    item = ds[0]
    gt = item['gt'].numpy().transpose(1, 2, 0)
    lq = item['lq'].numpy().transpose(1, 2, 0)
    photo = skimage.data.chelsea()  # 300x451 -> mod-crop to 300x450
    np.testing.assert_array_equal(gt, photo[:300, :450].astype(np.float32) / 255)
    np.testing.assert_allclose(lq, _bicubic_8bit(gt, scale), rtol=0, atol=1e-6)
    np.testing.assert_allclose(lq * 255, np.round(lq * 255), rtol=0, atol=1e-4)  # 8-bit values

    # the val centre window is an aligned crop of the same pair
    small = _make('val', scale, images=['chelsea'], val_size=96)[0]
    h, w = 100, 150
    top, left = (h - 32) // 2, (w - 32) // 2
    torch.testing.assert_close(small['lq'], item['lq'][:, top:top + 32, left:left + 32], rtol=0, atol=0)
    torch.testing.assert_close(small['gt'], item['gt'][:, top * 3:top * 3 + 96, left * 3:left * 3 + 96], rtol=0, atol=0)


def test_hr_downscale():
    ds = _make('val', 2, images=['astronaut'], val_size=0, hr_downscale=2)
    item = ds[0]
    assert tuple(item['gt'].shape) == (3, 256, 256) and tuple(item['lq'].shape) == (3, 128, 128)
    expected = _bicubic_8bit(skimage.data.astronaut().astype(np.float32) / 255, 2)
    np.testing.assert_allclose(item['gt'].numpy().transpose(1, 2, 0), expected, rtol=0, atol=1e-6)


def test_grayscale_photo_becomes_rgb():
    item = _make('val', 2, images=['camera'])[0]
    assert item['gt'].shape[0] == 3
    torch.testing.assert_close(item['gt'][0], item['gt'][2])


def test_augmentation_deterministic_consistent_and_cache_untouched():
    scale = 2
    ds = _make('train', scale, gt_size=48, use_hflip=True, use_rot=True)
    before = [ds.get_full_pair(i) for i in range(len(ds))]

    random.seed(123)
    first = [ds[i % len(ds)] for i in range(20)]
    random.seed(123)
    second = [ds[i % len(ds)] for i in range(20)]
    for a, b in zip(first, second):
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gt'], b['gt'])

    # flips/rotations are applied jointly: the LR patch is still the bicubic image of the HR patch away from the
    # patch border (the bicubic kernel reaches 2 LR pixels); 1/255 allows for a different 8-bit rounding
    for item in first:
        gt = item['gt'].numpy().transpose(1, 2, 0)
        lq = item['lq'].numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(lq[3:-3, 3:-3], _bicubic_8bit(gt, scale)[3:-3, 3:-3], rtol=0, atol=1 / 255 + 1e-6)

    # augment() flips in place; the cached photos must not change
    for (hr0, lr0), i in zip(before, range(len(ds))):
        hr1, lr1 = ds.get_full_pair(i)
        np.testing.assert_array_equal(hr0, hr1)
        np.testing.assert_array_equal(lr0, lr1)


def test_unknown_key_raises():
    with pytest.raises(ValueError, match='dataroot_gt') as info:
        _make('train', 2, dataroot_gt='datasets/DIV2K')
    assert 'gt_size' in str(info.value)  # lists the accepted keys


def test_unknown_image_or_split_raises():
    with pytest.raises(ValueError, match='lena') as info:
        _make('val', 2, images=['astronaut', 'lena'])
    assert 'chelsea' in str(info.value)  # lists the valid names
    with pytest.raises(ValueError, match='valid'):
        _make('val', 2, split='valid')
    with pytest.raises(ValueError, match='duplicate'):
        _make('val', 2, images=['chelsea', 'chelsea'])


@pytest.mark.parametrize(('kwargs', 'match'), [
    ({'gt_size': 33}, 'gt_size'),
    ({'gt_size': 2000}, 'exceeds'),
    ({'hr_downscale': 0.5}, 'hr_downscale'),
    ({'scale': None}, 'scale'),
    ({'phase': 'training'}, 'phase'),
])
def test_bad_values_raise(kwargs, match):
    opt = {'phase': 'train', 'scale': 2, 'gt_size': 32}
    opt.update(kwargs)
    with pytest.raises(ValueError, match=match):
        EmbeddedSRDataset(opt)


def test_picklable_for_dataloader_workers():
    ds = _make('val', 2)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]['lq'], ds[1]['lq'])


def test_build_dataset_and_dataloader():
    opt = {
        'name': 'embedded', 'type': 'EmbeddedSRDataset', 'phase': 'train', 'scale': 2, 'gt_size': 32,
        'use_hflip': True, 'use_rot': True, 'batch_size_per_gpu': 2, 'num_worker_per_gpu': 0,
        'dataset_enlarge_ratio': 1
    }
    ds = build_dataset(opt)
    assert isinstance(ds, EmbeddedSRDataset)
    loader = build_dataloader(ds, opt, num_gpu=0, dist=False, sampler=None, seed=0)
    batches = list(loader)
    assert len(batches) == len(ds) // 2
    for batch in batches:
        assert batch['lq'].shape == (2, 3, 16, 16) and batch['gt'].shape == (2, 3, 32, 32)
        assert batch['lq'].dtype == torch.float32
        assert len(batch['lq_path']) == 2 and all(p.startswith('skimage/') for p in batch['lq_path'])

    val_opt = {'name': 'embedded_val', 'type': 'EmbeddedSRDataset', 'phase': 'val', 'scale': 2}
    val_ds = build_dataset(val_opt)
    val_loader = build_dataloader(val_ds, val_opt, num_gpu=0, dist=False, sampler=None, seed=0)
    names = [osp.splitext(osp.basename(b['lq_path'][0]))[0] for b in val_loader]
    assert names == embedded_image_names('val')
