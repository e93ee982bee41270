#!/usr/bin/env python
"""Write the README's option tables from the option schema (``odm_basicsr/option_schema.py``).

Usage::

    python scripts/make_option_tables.py            # rewrite the tables between the README's markers
    python scripts/make_option_tables.py --check    # exit 1 if the README's tables differ from the schema

Each documented section ``<name>`` (``network_g``, ``train``) is written between ``<!-- options:<name> -->`` and
``<!-- /options:<name> -->``; the rest of the README is left as it is.
"""
import argparse
import os
import sys

from odm_basicsr.option_schema import update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--readme', default=os.path.join(ROOT, 'README.md'), help='default: the repository\'s')
    parser.add_argument('--check', action='store_true', help='only compare with the README on disk')
    args = parser.parse_args(argv)
    with open(args.readme, encoding='utf-8') as f:
        text = f.read()
    new = update_readme(text)
    if args.check:
        if new != text:
            print(f'{args.readme}: the option tables differ from the schema; rerun scripts/make_option_tables.py')
            return 1
        print(f'{args.readme}: option tables up to date')
        return 0
    if new != text:
        with open(args.readme, 'w', encoding='utf-8') as f:
            f.write(new)
    print(f'{args.readme}: option tables {"written" if new != text else "already up to date"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
