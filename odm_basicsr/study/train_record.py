"""The record of a training run: ``odm-train`` that also writes ``experiments/<name>/train_record.jsonl``.

``python -m odm_basicsr.study.train_record -opt X.yml [odm-train flags]`` runs ``odm-train``; each logged
iteration (the values BasicSR's message logger gets: losses, ``coop``, learning rates), each validation (the
model's ``metric_results``), a resume and the end of training add one JSON line to the record, taken from those
structures rather than from the text log. A study reads it with :func:`read_record` (the whole file) or
:class:`RecordTail` (the lines added since the last look, while the run goes on).

Entries: ``{"event": "iter", "iter", "epoch", "lrs", "eta", "values": {...}}``, ``{"event": "val", "iter",
"dataset", "metrics": {...}}``, ``{"event": "resume", "iter", "epoch"}``, ``{"event": "end", "iter",
"time_consumed"}`` (BasicSR's ``h:mm:ss`` from the start of the training loop).
"""
import datetime
import json
import os
import sys
import time

RECORD_FILE = 'train_record.jsonl'


def record_path(experiments_root):
    """Where the run whose experiment folder is ``experiments_root`` writes its record."""
    return os.path.join(experiments_root, RECORD_FILE)


class _Record:
    """The record file of this process's run (rank 0 only)."""

    def __init__(self):
        self.path = None
        self.started = None  # when the training loop began (the message logger is made just before it)

    def open(self, opt):
        if opt.get('rank', 0) == 0:
            self.path = record_path(opt['path']['experiments_root'])

    def write(self, event, **fields):
        if self.path is not None:
            with open(self.path, 'a', encoding='utf-8') as f:
                f.write(json.dumps({'event': event, **fields}) + '\n')


def _float(v):
    return float(v.item()) if hasattr(v, 'item') else float(v)


def install(record=None):
    """Make BasicSR's training pipeline (``basicsr.train``) write the record; returns the record."""
    import basicsr.train

    record = record or _Record()
    base_logger, base_build = basicsr.train.MessageLogger, basicsr.train.build_model

    class RecordingMessageLogger(base_logger):
        """BasicSR's message logger, writing each logged iteration to the record before printing it."""

        def __init__(self, opt, start_iter=1, tb_logger=None):
            super().__init__(opt, start_iter, tb_logger)
            record.started = time.time()

        def __call__(self, log_vars):
            it = log_vars['iter']
            eta = None
            if 'time' in log_vars:  # as BasicSR's logger computes it
                eta_sec = (time.time() - self.start_time) / (it - self.start_iter + 1) * (self.max_iters - it - 1)
                eta = str(datetime.timedelta(seconds=int(eta_sec)))
            values = {k: _float(v) for k, v in log_vars.items() if k not in ('epoch', 'iter', 'lrs', 'time',
                                                                             'data_time')}
            record.write('iter', iter=it, epoch=log_vars['epoch'], lrs=[float(v) for v in log_vars['lrs']], eta=eta,
                         values=values)
            super().__call__(log_vars)

    def build_model(opt):
        model = base_build(opt)
        record.open(opt)
        validation, resume_training, save = model.validation, model.resume_training, model.save

        def recording_validation(dataloader, current_iter, tb_logger, save_img=False):
            validation(dataloader, current_iter, tb_logger, save_img)
            metrics = {k: _float(v) for k, v in (getattr(model, 'metric_results', None) or {}).items()}
            record.write('val', iter=current_iter, dataset=dataloader.dataset.opt.get('name'), metrics=metrics)

        def recording_resume(resume_state):
            resume_training(resume_state)
            record.write('resume', iter=resume_state['iter'], epoch=resume_state['epoch'])

        def recording_save(epoch, current_iter):
            if current_iter == -1 and record.started is not None:  # the latest model: training has ended
                consumed = str(datetime.timedelta(seconds=int(time.time() - record.started)))
                record.write('end', iter=opt['train']['total_iter'], time_consumed=consumed)
            save(epoch, current_iter)

        model.validation, model.resume_training, model.save = recording_validation, recording_resume, recording_save
        return model

    basicsr.train.MessageLogger = RecordingMessageLogger
    basicsr.train.build_model = build_model
    return record


def read_record(path):
    """The entries of a record file (``[]`` if there is none)."""
    tail = RecordTail(path)
    return tail.new_entries()


class RecordTail:
    """Reads a record as it grows: :meth:`new_entries` gives the complete lines added since the last call.

    ``from_end``: start after what the file holds now (a resumed run appends to its record). A file that became
    shorter is read from its start (BasicSR moved the old experiment folder aside and a fresh run began).
    """

    def __init__(self, path, from_end=False):
        self.path = path
        self.offset = os.path.getsize(path) if from_end and os.path.isfile(path) else 0

    def new_entries(self):
        if not os.path.isfile(self.path):
            return []
        if os.path.getsize(self.path) < self.offset:
            self.offset = 0
        with open(self.path, 'rb') as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b'\n') + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode('utf-8').splitlines() if line.strip()]


def main(argv=None):
    import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration before basicsr.train is touched)
    from odm_basicsr.train import main as train_main

    install()
    train_main(sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
    main()
