"""``odm_basicsr.network_options``: one reading of an option file into a network and a scale, for every tool."""
import json

import pytest
import torch
import yaml

from odm_basicsr.network_options import OptionFileError, build_network, read_network_options, window_size

# EDSR without an upscale option: BasicSR builds it with the signature's default, x4. odm-cost read x4 from the
# signature while odm-eval (and the demo, odm-inspect, odm-export, the scripts) stopped with "no scale".
NO_UPSCALE = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1}


@pytest.mark.parametrize('content', [
    NO_UPSCALE,  # a network_g-only file
    {'network_g': NO_UPSCALE},  # network_g without a scale
    {'network_g': {'type': 'Quantized', 'arch': NO_UPSCALE, 'w_bits': 4, 'a_bits': 4}},
])
def test_the_formerly_disagreeing_file_gives_one_scale_to_every_tool(tmp_path, capsys, content):
    from basicsr.metrics import calculate_psnr

    from odm_basicsr import cost, evaluate, scoring

    opt = tmp_path / 'net.yml'
    opt.write_text(yaml.safe_dump(content))
    net_opt, scale = read_network_options(str(opt))
    assert scale == 4

    cost.main(['-opt', str(opt), '--json', '--output-size', '32x16'])  # odm-cost
    assert json.loads(capsys.readouterr().out)['scale'] == 4

    import cv2
    import numpy as np
    bench = tmp_path / 'bench' / 'Tiny'
    (bench / 'HR').mkdir(parents=True)
    (bench / 'LRbicx4').mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(bench / 'HR' / 'a.png'), rng.integers(0, 256, (32, 24, 3), dtype=np.uint8))
    cv2.imwrite(str(bench / 'LRbicx4' / 'a.png'), rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
    torch.manual_seed(0)
    net = build_network(net_opt).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 8, 6)).shape[-2:] == (32, 24)  # the network BasicSR builds is x4
    ckpt = tmp_path / 'net.pth'
    torch.save({'params': net.state_dict()}, ckpt)
    evaluate.main(['-opt', str(opt), '--checkpoint', str(ckpt), '--data', str(tmp_path / 'bench'), '--sets', 'Tiny',
                   '--out', str(tmp_path / 'out'), '--device', 'cpu'])  # odm-eval
    row = (tmp_path / 'out' / 'eval.csv').read_text().splitlines()[1].split(',')
    assert row[2] == '4'
    name, lq, gt = scoring.load_benchmark(str(tmp_path / 'bench'), 'Tiny', 4)[0]
    with torch.no_grad():
        sr = scoring.super_resolve(net, lq, 4)
    assert float(row[3]) == pytest.approx(calculate_psnr(sr, gt, crop_border=4, test_y_channel=True), abs=1e-6)


def test_scale_order_and_errors(tmp_path):
    path = tmp_path / 'x.yml'
    path.write_text(yaml.safe_dump({'scale': 3, 'network_g': dict(NO_UPSCALE, upscale=2)}))
    assert read_network_options(str(path))[1] == 3  # the file's scale first
    assert read_network_options(str(path), 2)[1] == 2  # then the caller's (--scale)
    path.write_text(yaml.safe_dump({'network_g': dict(NO_UPSCALE, upscale=2)}))
    assert read_network_options(str(path))[1] == 2  # the arch's option
    for content, message in (({'network_g': {'type': 'EDSRR'}}, "unknown network_g.type 'EDSRR'"),
                             ({'name': 'x'}, 'has no network_g entry'), ({'scale': 0, 'network_g': NO_UPSCALE},
                                                                         'scale must be a positive integer')):
        path.write_text(yaml.safe_dump(content))
        with pytest.raises(OptionFileError, match=message):
            read_network_options(str(path))
    with pytest.raises(OptionFileError, match='option file not found'):
        read_network_options(str(tmp_path / 'nope.yml'))


def test_window_size_of_a_windowed_arch():
    assert window_size({'type': 'SwinIR', 'window_size': 8}) == 8
    assert window_size({'type': 'Quantized', 'arch': {'type': 'SwinIR', 'window_size': 4}}) == 4
    assert window_size(NO_UPSCALE) is None


def test_packaged_option_files_are_found_by_name():
    """odm-eval / odm-cost / odm-export / the demo read packaged option files by name, as odm-train does."""
    from odm_basicsr.network_options import read_network_options

    for name in ('test/RLFN/test_RLFN_x4.yml', 'options/test/RLFN/test_RLFN_x4.yml', 'test_RLFN_x4.yml'):
        net_opt, scale = read_network_options(name)
        assert net_opt['type'] == 'RLFN' and scale == 4
