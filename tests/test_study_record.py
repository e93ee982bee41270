"""The training record a study reads instead of BasicSR's console (the real runs: test_demo, test_mini_study)."""
import json

from odm_basicsr.study.runner import diff_keys, record_summary
from odm_basicsr.study.train_record import RecordTail, read_record


def _line(**entry):
    return (json.dumps(entry) + '\n').encode()


def test_tail_gives_complete_lines_once_and_restarts_on_a_new_file(tmp_path):
    path = tmp_path / 'train_record.jsonl'
    tail = RecordTail(str(path))
    assert tail.new_entries() == []  # no file yet
    path.write_bytes(_line(event='iter', iter=1, values={'l_pix': 0.5}) + b'{"event": "val", "it')
    assert [e['iter'] for e in tail.new_entries()] == [1]  # the half-written line waits
    with open(path, 'ab') as f:
        f.write(b'er": 2, "metrics": {"psnr": 30.0, "ssim": 0.9}}\n')
    assert tail.new_entries() == [{'event': 'val', 'iter': 2, 'metrics': {'psnr': 30.0, 'ssim': 0.9}}]
    assert tail.new_entries() == []
    assert RecordTail(str(path), from_end=True).new_entries() == []  # a resumed run: only what it adds
    path.write_bytes(_line(event='iter', iter=7, values={}))  # shorter: BasicSR archived the old folder
    assert [e['iter'] for e in tail.new_entries()] == [7]
    assert len(read_record(str(path))) == 1 and read_record(str(tmp_path / 'none.jsonl')) == []


def test_summary_is_the_last_validation_and_the_end():
    entries = [{'event': 'val', 'iter': 5, 'metrics': {'psnr': 20.0, 'ssim': 0.5}},
               {'event': 'end', 'iter': 10, 'time_consumed': '0:00:12'},
               {'event': 'val', 'iter': 10, 'metrics': {'psnr': 21.0, 'ssim': 0.6}}]
    assert record_summary(entries) == {'basicsr_time_consumed': '0:00:12', 'log_psnr': 21.0, 'log_ssim': 0.6}
    assert record_summary([]) == {'basicsr_time_consumed': None, 'log_psnr': None, 'log_ssim': None}


def test_diff_keys_names_the_changed_settings():
    a = {'train': {'total_iter': 4, 'optim_g': {'lr': 1e-4}}, 'name': 'x'}
    b = {'train': {'total_iter': 5, 'optim_g': {'lr': 1e-4}}, 'name': 'x', 'extra': 1}
    assert diff_keys(a, b) == ['extra', 'train.total_iter']
