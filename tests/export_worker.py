"""Subprocess side of the kill test: `export_worker.py STORE OUT` exports mean + window:4 of
layers 1-4 as npy, committing after every batch of a few rows, so a kill lands mid-way."""

import logging
import sys

from hallulens_analysis import Selection, build_plan, export_npy, open_store

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with open_store(sys.argv[1]) as store:
        plan = build_plan(store, Selection.parse("1-4", ["mean", "window:4"]))
        export_npy(store, plan, sys.argv[2], budget_bytes=64 << 10, commit_bytes=0)
