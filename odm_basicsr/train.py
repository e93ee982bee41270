"""``odm-train -opt X.yml`` (or ``python -m odm_basicsr.train``): BasicSR's training pipeline with this plugin.

Accepts BasicSR's flags: ``--launcher none|pytorch|slurm``, ``--auto_resume``, ``--debug``, ``--force_yml``.
"""


def main(argv=None):
    from odm_basicsr.cli import run_pipeline  # importing odm_basicsr first makes basicsr importable

    run_pipeline(is_train=True, argv=argv)


if __name__ == '__main__':
    main()
