"""Shared plumbing of the ``odm-train`` / ``odm-test`` entry points."""
import os
import sys


def _normalise_argv(argv):
    # torch.distributed.launch passes --local-rank (dash); BasicSR's parser only knows --local_rank.
    return [a.replace('--local-rank', '--local_rank', 1) if a.startswith('--local-rank') else a for a in argv]


def _fail(is_train, message, status):
    """One line ``odm-train: error: <message>`` (``odm-test``) on stderr, then exit with ``status``."""
    print(f'{"odm-train" if is_train else "odm-test"}: error: {message}', file=sys.stderr, flush=True)
    sys.exit(status)


def _log_to_files(message):
    """Record ``message`` in the log files of BasicSR's logger (if any), not on the console."""
    import logging

    logger = logging.getLogger('basicsr')
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None))


def run_pipeline(is_train, argv=None):
    """Run BasicSR's ``train_pipeline`` / ``test_pipeline`` with this plugin registered.

    Outputs (``experiments/``, ``results/``, ``tb_logger/``) go under the current directory. Options are checked
    by :func:`odm_basicsr.utils.option_check.check_options` right after BasicSR parses them, before any folder is
    created; a mistake (or a missing option file) ends the program with a one-line message and exit status 2.

    A non-finite network ends it with a one-line message (also written to the run's log file) and exit status 3:
    a checkpoint to load (``pretrain_network_g``, resume state) holding NaN / Inf values, a checkpoint that would be
    written with them (it is not written) (:class:`odm_basicsr.guards.NonFiniteError`), or a training run that
    diverged (:class:`odm_basicsr.guards.TrainingDivergedError`).

    ``-opt`` takes a file, or the name of an option file packaged with odm-basicsr (``train/demo/...yml``; see
    :mod:`odm_basicsr.option_files`), used when no file of that path exists. ``--list-options`` prints the packaged
    names and exits (without importing BasicSR).

    Exit status: 0 done, 2 option error, 3 non-finite network / diverged training (others: an unexpected error).
    """
    from odm_basicsr import option_files

    args = _normalise_argv(sys.argv[1:] if argv is None else list(argv))
    if '--list-options' in args:
        sys.stdout.write(option_files.listing())
        return

    import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)
    from odm_basicsr.guards import NonFiniteError, TrainingDivergedError
    from odm_basicsr.utils.option_check import OptionError, check_options

    if is_train:
        import basicsr.train as pipeline_module
    else:
        import basicsr.test as pipeline_module

    original_parse = pipeline_module.parse_options

    def parse_and_check(root_path, is_train=is_train):
        opt, args = original_parse(root_path, is_train=is_train)
        if not is_train and isinstance(opt.get('val'), dict):
            opt['val'].setdefault('suffix', None)  # BasicSR's test pipeline needs the key
        check_options(opt, is_train)
        return opt, args

    sys.argv = [sys.argv[0]] + args
    opt_index = sys.argv.index('-opt') + 1 if '-opt' in sys.argv else None
    if opt_index is not None and opt_index < len(sys.argv):
        given = sys.argv[opt_index]
        found = option_files.resolve(given)
        if found is None:
            _fail(is_train, f'option file not found: {given} (the packaged ones: '
                  f'{"odm-train" if is_train else "odm-test"} --list-options)', 2)
        if found != given:
            print(f'{"odm-train" if is_train else "odm-test"}: packaged option file {found}', file=sys.stderr,
                  flush=True)
            sys.argv[opt_index] = found
    pipeline_module.parse_options = parse_and_check
    try:
        run = pipeline_module.train_pipeline if is_train else pipeline_module.test_pipeline
        run(os.getcwd())
    except SystemExit:
        if '-h' in args or '--help' in args:
            print('\npackaged option files: --list-options prints their names, which -opt accepts')
        raise
    except OptionError as e:
        _fail(is_train, e, 2)
    except (NonFiniteError, TrainingDivergedError) as e:
        message = ' '.join(str(e).split())
        _log_to_files(f'{type(e).__name__}: {message}')
        _fail(is_train, message, 3)
    finally:
        pipeline_module.parse_options = original_parse
