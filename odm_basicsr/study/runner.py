"""Stages of a study, each one ``odm-train`` run in a subprocess, in a work folder (the current directory).

A stage whose checkpoint exists is skipped (rerunning a study resumes it); one interrupted after a saved training
state resumes from it (``--auto_resume``); one whose option file differs from the settings it was trained with is
refused. Progress and results come from the run's record (:mod:`odm_basicsr.study.train_record`); its full console
output goes to ``console/<stage>.txt``.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from copy import deepcopy

from .results import write_json
from .train_record import RecordTail, read_record, record_path


class Stage:
    """One run of a study. ``checkpoint``: a given file (a pretrained FP network, not trained here: ``opt`` then
    only holds its ``network_g``) instead of the stage's own ``experiments/<name>/models/net_g_latest.pth``;
    ``param_key``: its entry (``params_ema`` falls back to ``params``, then to a bare state dict)."""

    def __init__(self, name, method, bits, opt, checkpoint=None, param_key='params_ema'):
        self.name, self.method, self.bits, self.opt = name, method, bits, opt
        self._checkpoint, self.param_key = checkpoint, param_key

    @property
    def pretrained(self):
        return self._checkpoint is not None

    @property
    def checkpoint(self):
        if self._checkpoint is not None:
            return self._checkpoint
        return os.path.join('experiments', self.name, 'models', 'net_g_latest.pth')

    @property
    def record(self):
        """The run's record file (relative to the work folder)."""
        return record_path(os.path.join('experiments', self.name))


def dump_yaml(opt, path):
    """Write an option dict as BasicSR reads it back (floats always with a ``.``: PyYAML reads ``1e-06`` as text)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def float_repr(dumper, value):
        text = repr(value)
        if 'e' in text and '.' not in text.split('e')[0]:
            text = text.replace('e', '.0e', 1)
        return dumper.represent_scalar('tag:yaml.org,2002:float', text)

    Dumper.add_representer(float, float_repr)
    with open(path, 'w', encoding='utf-8') as f:
        yaml.dump(opt, f, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def load_yaml(path):
    import yaml

    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def load_json(path):
    """The JSON value in ``path``, or None when it is absent or unreadable."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _comparable(opt):
    opt = deepcopy(opt)
    opt.pop('num_gpu', None)  # the device may change between runs of one study
    return opt


def diff_keys(a, b, prefix=''):
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff_keys(a.get(k), b.get(k), f'{prefix}{k}.')
        return out
    return [] if a == b else [prefix.rstrip('.')]


def _stage_started(name):
    root = os.path.join('experiments', name)
    return os.path.isfile(os.path.join(root, 'models', 'net_g_latest.pth')) or (
        os.path.isdir(os.path.join(root, 'training_states')) and os.listdir(os.path.join(root, 'training_states')))


def check_reuse(stage, opt_path, prog='odm-demo'):
    """Refuse to resume or reuse a stage trained with other settings."""
    if not (os.path.isfile(opt_path) and _stage_started(stage.name)):
        return
    diff = diff_keys(_comparable(load_yaml(opt_path)), _comparable(stage.opt))
    if diff:
        raise SystemExit(f'{prog}: error: stage {stage.name} in {os.getcwd()} was trained with other settings '
                         f'({", ".join(diff[:6])} differ). Use another --out, or delete experiments/{stage.name} '
                         f'to retrain it.')


class _Progress:
    """Turns record entries into the progress lines of a stage."""

    def __init__(self, stage, total, log):
        self.stage, self.total, self.log, self.last_val = stage, total, log, None

    def show(self, entry):
        name, event = self.stage, entry['event']
        if event == 'iter':
            values = ' '.join(f'{k} {v:.4g}' for k, v in entry['values'].items())
            eta = entry.get('eta')
            eta = f'  eta {eta}' if eta and not eta.startswith('-') else ''
            self.log(f'[{name}] iter {entry["iter"]}/{self.total} {values}{eta}')
        elif event == 'val' and {'psnr', 'ssim'} <= set(entry['metrics']):
            shown = f'[{name}] val psnr {entry["metrics"]["psnr"]:.2f} dB  ssim {entry["metrics"]["ssim"]:.4f}'
            if shown != self.last_val:  # the final validation repeats the one at the last iteration
                self.log(shown)
            self.last_val = shown
        elif event == 'resume':
            self.log(f'[{name}] Resuming training from epoch: {entry["epoch"]}, iter: {entry["iter"]}.')


def record_summary(entries):
    """``{'basicsr_time_consumed', 'log_psnr', 'log_ssim'}`` of a record: the end and the last validation."""
    val = next((e['metrics'] for e in reversed(entries) if e['event'] == 'val'), {})
    end = next((e for e in reversed(entries) if e['event'] == 'end'), {})
    return {'basicsr_time_consumed': end.get('time_consumed'), 'log_psnr': val.get('psnr'),
            'log_ssim': val.get('ssim')}


def run_stage(stage, log=print, prog='odm-demo'):
    """Train one stage (or skip it when its checkpoint exists). Returns its record. cwd = the work folder."""
    os.makedirs('options', exist_ok=True)
    os.makedirs('console', exist_ok=True)
    opt_path = os.path.join('options', f'{stage.name}.yml')
    meta_path = os.path.join('experiments', stage.name, 'demo_stage.json')
    check_reuse(stage, opt_path, prog)
    dump_yaml(stage.opt, opt_path)
    if os.path.isfile(stage.checkpoint):
        meta = load_json(meta_path) or {}
        log(f'[{stage.name}] skipped: {stage.checkpoint} exists (finished earlier)')
        return {**meta, 'skipped': True}
    total = stage.opt['train']['total_iter']
    cmd = [sys.executable, '-m', 'odm_basicsr.study.train_record', '-opt', opt_path, '--auto_resume']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    log(f'[{stage.name}] training: {total} iterations ({shlex.join(cmd[1:])})')
    start = time.time()
    tail, progress, record = [], _Progress(stage.name, total, log), RecordTail(stage.record, from_end=True)
    with open(os.path.join('console', f'{stage.name}.txt'), 'a', encoding='utf-8') as console:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        for line in proc.stdout:
            console.write(line)
            tail = (tail + [line.rstrip('\n')])[-40:]
            for entry in record.new_entries():  # written before BasicSR prints the line
                progress.show(entry)
        rc = proc.wait()
    for entry in record.new_entries():
        progress.show(entry)
    seconds = time.time() - start
    if rc != 0 or not os.path.isfile(stage.checkpoint):
        raise SystemExit(f'{prog}: error: stage {stage.name} failed (exit status {rc}); last output:\n'
                         + '\n'.join(tail) + f'\n(full output: {os.path.abspath("console")}/{stage.name}.txt)')
    meta = {'train_wall_s': round(seconds, 1), **record_summary(read_record(stage.record)), 'iters': total}
    write_json(meta_path, meta)
    log(f'[{stage.name}] done in {seconds:.0f} s')
    return {**meta, 'skipped': False}
