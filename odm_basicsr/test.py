"""``odm-test -opt X.yml`` (or ``python -m odm_basicsr.test``): BasicSR's test pipeline with this plugin.

``val.suffix`` may be omitted (BasicSR 1.4.2 requires it).
"""


def main(argv=None):
    from odm_basicsr.cli import run_pipeline  # importing odm_basicsr first makes basicsr importable

    run_pipeline(is_train=False, argv=argv)


if __name__ == '__main__':
    main()
