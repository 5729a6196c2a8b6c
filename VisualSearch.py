"""The original project's entry point: ``python VisualSearch.py -yml application.yaml``.

Runs the whole pipeline (prepare, extract, train, index, evaluate), the same as
``visualsearch run -c application.yaml``.
"""
import sys

from vslib.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
