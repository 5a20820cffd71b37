"""Render the walkthrough figures of a real run into argv[1] and check what was written."""
import os
import sys

from mpi4py import MPI
from PIL import Image

from ringlab.teach.walkthrough import record_ring_allreduce
from ringlab.teach.walkthrough_figures import render_walkthrough_figures, step_figure_names

comm = MPI.COMM_WORLD
records, final = record_ring_allreduce(comm)
assert (final == (1 << comm.size) - 1).all(), "walkthrough run gave a wrong sum"
if comm.rank == 0:
    outdir = sys.argv[1]
    paths = render_walkthrough_figures(records, outdir)
    n = comm.size
    pngs = [os.path.join(outdir, name) for name in step_figure_names(n)]
    assert paths == pngs + [os.path.join(outdir, "walkthrough_animation.gif")], paths
    sizes = {Image.open(p).size for p in pngs}
    assert len(sizes) == 1, f"frames differ in size: {sizes}"
    gif = Image.open(paths[-1])
    assert gif.n_frames == 2 * (n - 1) + 1, gif.n_frames
    print(f"figures ok: {len(pngs)} PNGs of {sizes.pop()} and a {gif.n_frames}-frame GIF")
