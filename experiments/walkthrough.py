"""Regenerate docs/walkthrough.md's step tables and figures from a real ring all-reduce.

    mpirun -n 4 python experiments/walkthrough.py --figures docs/img --markdown docs/walkthrough.md
    mpirun -n 4 python experiments/walkthrough.py --check docs/walkthrough.md   # exit 1 if the doc drifted

Rank r contributes 2**r, so every recorded value names its addends; the figures and tables are
read from the values the executor actually held after each step.
"""
import argparse
import difflib
import os
import sys

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.teach.walkthrough import format_walkthrough, record_ring_allreduce  # noqa: E402
from ringlab.teach.walkthrough_figures import (extract_generated_section, render_walkthrough_figures,  # noqa: E402
                                             walkthrough_markdown_tables, write_walkthrough_markdown)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figures", metavar="DIR", help="write one PNG per step and walkthrough_animation.gif here")
    p.add_argument("--markdown", metavar="PATH", help="rewrite the generated section of this Markdown file")
    p.add_argument("--check", metavar="PATH", help="compare the generated section of PATH with this run; exit 1 if it differs")
    p.add_argument("--image-dir", metavar="REL",
                   help="image path as the Markdown links it (default: --figures relative to the Markdown file, else img)")
    p.add_argument("--no-gif", action="store_true", help="skip the animated GIF")
    p.add_argument("--text", action="store_true", help="also print the plain-text tables")
    return p.parse_args(argv)


def image_dir_for(args, md_path):
    if args.image_dir is not None:
        return args.image_dir
    if args.figures and md_path:
        return os.path.relpath(args.figures, os.path.dirname(os.path.abspath(md_path))).replace(os.sep, "/")
    return "img"


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    records, final = record_ring_allreduce(comm)
    ok = bool((final == (1 << comm.size) - 1).all())
    ok = comm.allreduce(ok, op=MPI.LAND)
    if comm.rank != 0:
        return 0 if ok else 1
    if not ok:
        print("FAILED: the recorded all-reduce did not produce 2**N - 1 everywhere", file=sys.stderr)
        return 1
    if args.text or not (args.figures or args.markdown or args.check):
        print(format_walkthrough(records))
    if args.figures:
        for path in render_walkthrough_figures(records, args.figures, gif=not args.no_gif):
            print(f"wrote {path}")
    if args.markdown:
        changed = write_walkthrough_markdown(records, args.markdown, image_dir_for(args, args.markdown))
        print(f"{'updated' if changed else 'unchanged'} {args.markdown}")
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            committed = extract_generated_section(f.read())
        fresh = walkthrough_markdown_tables(records, image_dir_for(args, args.check))
        if committed != fresh:
            diff = difflib.unified_diff(committed.splitlines(), fresh.splitlines(), "committed", "this run", lineterm="")
            print("\n".join(diff))
            print(f"DRIFT: {args.check} does not match a real {comm.size}-rank run; "
                  f"regenerate with experiments/walkthrough.py --markdown")
            return 1
        print(f"{args.check}: generated section matches a real {comm.size}-rank run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
