"""Pictures and Markdown tables of a recorded ring all-reduce (one per step), for docs/walkthrough.md."""
# Input is what ``walkthrough.record_ring_allreduce`` returns on rank 0: ``everyone[rank][i]`` is rank's
# i-th StepRecord (i = 0 is the start, then N-1 reduce-scatter and N-1 all-gather steps). Every value
# is a bit set of the ranks whose addends it holds (rank r contributed 2**r), so a chunk's colour
# stripes and its label are read straight off the recorded value: the figures are the run, not a drawing.

import math
import os

from ringlab.teach.walkthrough import rank_letter, symbolic

__all__ = ["render_walkthrough_figures", "step_figure_names", "walkthrough_markdown_tables",
           "write_walkthrough_markdown", "replace_generated_section", "extract_generated_section", "GENERATED_BEGIN", "GENERATED_END",
           "MAX_FIGURE_RANKS"]

MAX_FIGURE_RANKS = 8  # beyond this the ring of boxes no longer fits a readable page
GENERATED_BEGIN = "<!-- BEGIN GENERATED: experiments/walkthrough.py writes this section; do not edit by hand -->"
GENERATED_END = "<!-- END GENERATED -->"
_EMPTY = "#eeeeee"


def _check(everyone):
    if not everyone or not everyone[0]:
        raise ValueError("no walkthrough records: pass what record_ring_allreduce returns on rank 0")
    n = len(everyone)
    if any(len(recs) != len(everyone[0]) for recs in everyone):
        raise ValueError("every rank must have the same number of step records")
    if len(everyone[0]) != 2 * (n - 1) + 1:
        raise ValueError(f"expected 1 + 2(N-1) = {2 * n - 1} records per rank, got {len(everyone[0])}")
    return n


def _step_title(rec, n):
    if rec.phase == "start":
        return "start", "every rank holds only its own addends"
    if rec.phase == "reduce-scatter":
        return (f"reduce-scatter step {rec.step + 1} of {n - 1}",
                "each rank sends one chunk to the next rank and adds the chunk it receives")
    return (f"all-gather step {rec.step + 1} of {n - 1}",
            "each rank forwards one complete chunk; the receiver overwrites its copy")


def step_figure_names(n):
    """File names of the 2(N-1)+1 step figures, in order (the doc links these)."""
    names = ["walkthrough_step00_start.png"]
    for i in range(1, 2 * (n - 1) + 1):
        phase, s = ("rs", i) if i <= n - 1 else ("ag", i - (n - 1))
        names.append(f"walkthrough_step{i:02d}_{phase}{s}.png")
    return names


# ---- figures ---------------------------------------------------------------------------------------

def _rank_colors(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]


_ROW_H, _HEAD_H = 0.34, 0.38


def _box_size(n):
    """(width, height) of a rank box: wide enough for the longest label, a0+b0+...+x0."""
    return max(2.5, 1.4 + 0.105 * (3 * n - 1)), n * _ROW_H + _HEAD_H


def _draw_rank_box(ax, cx, cy, rank, holds, colors, sent_chunk, recv_chunk, phase):
    """A rank as a box with one row per chunk: N colour stripes (stripe k filled if the chunk holds
    rank k's addend) and the symbolic sum. Returns the outer patch (arrows clip against it)."""
    from matplotlib.patches import FancyBboxPatch, Rectangle
    n = len(holds)
    row_h, head = _ROW_H, _HEAD_H
    width, height = _box_size(n)
    x0, y0 = cx - width / 2, cy - height / 2
    box = FancyBboxPatch((x0, y0), width, height, boxstyle="round,pad=0.04", fc="white", ec="#333333", lw=1.4)
    ax.add_patch(box)
    ax.text(cx, y0 + height - head / 2, f"rank {rank_letter(rank)}", ha="center", va="center",
            fontsize=11, weight="bold", color=colors[rank])
    stripe_w = 0.9 / n
    for c, value in enumerate(holds):
        ry = y0 + height - head - (c + 1) * row_h
        ax.text(x0 + 0.08, ry + row_h / 2, str(c), ha="left", va="center", fontsize=8, color="#666666")
        for k in range(n):
            has = (value >> k) & 1
            ax.add_patch(Rectangle((x0 + 0.28 + k * stripe_w, ry + 0.05), stripe_w, row_h - 0.1,
                                   fc=colors[k] if has else _EMPTY, ec="white", lw=0.5))
        complete = value == (1 << n) - 1
        ax.text(x0 + 1.25, ry + row_h / 2, symbolic(value, c), ha="left", va="center", fontsize=7.5,
                weight="bold" if complete else "normal")
        if c == sent_chunk:
            ax.add_patch(Rectangle((x0 + 0.02, ry + 0.01), width - 0.04, row_h - 0.02, fill=False,
                                   ec="#222222", lw=1.8))
        if c == recv_chunk:
            ax.add_patch(Rectangle((x0 + 0.02, ry + 0.01), width - 0.04, row_h - 0.02, fill=False,
                                   ec="#d62728" if phase == "reduce-scatter" else "#1f77b4", lw=1.8, ls="--"))
    return box


def _draw_step(everyone, i, path, dpi):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, Patch

    n = len(everyone)
    recs = [everyone[r][i] for r in range(n)]
    colors = _rank_colors(n)
    width, height = _box_size(n)
    # Neighbouring boxes sit far enough apart to leave room for the arrow and its label.
    spacing = max(width, height) + 1.6
    radius = max(3.0, spacing / (2 * math.sin(math.pi / n))) if n > 2 else 2.6
    centers = []
    for r in range(n):
        # Clockwise from the top left, so for N = 4: a top left, b top right, c bottom right, d bottom left.
        theta = math.radians(90 + 180 / n - r * 360 / n)
        centers.append((radius * math.cos(theta), radius * math.sin(theta)))
    span = max(max(abs(x) + width / 2 for x, _ in centers), max(abs(y) + height / 2 for _, y in centers)) + 0.3
    side = 8 * max(1.0, span / 5.2)  # keep text the same size in inches as N grows
    fig = plt.figure(figsize=(side, side * 1.05), dpi=dpi)
    ax = fig.add_axes([0.02, 0.08, 0.96, 0.80])
    ax.set_xlim(-span, span)
    ax.set_ylim(-span, span)
    ax.set_aspect("equal")
    ax.axis("off")
    boxes = []
    for r, rec in enumerate(recs):
        sent = rec.send_chunk if rec.phase != "start" else None
        got = rec.recv_chunk if rec.phase != "start" else None
        boxes.append(_draw_rank_box(ax, *centers[r], r, rec.holds, colors, sent, got, rec.phase))
    start = recs[0].phase == "start"
    for r, rec in enumerate(recs):
        dst = (r + 1) % n  # the ring's direction; at the start it is drawn faint, with nothing sent yet
        arrow = FancyArrowPatch(centers[r], centers[dst], patchA=boxes[r], patchB=boxes[dst],
                                arrowstyle="-|>", mutation_scale=18, lw=2, color="#cccccc" if start else "#444444",
                                connectionstyle="arc3,rad=-0.25", zorder=3)
        ax.add_patch(arrow)
        if not start:
            (ax_, ay), (bx, by) = centers[r], centers[dst]
            mx, my = (ax_ + bx) / 2, (ay + by) / 2
            # Push the label outwards, past the arc's bulge, so it never sits on a box.
            norm = math.hypot(mx, my) or 1.0
            lx, ly = mx + 0.55 * mx / norm, my + 0.55 * my / norm
            # Long sums (N > 4) would cover the boxes; the box rows already show the values.
            label = f"{symbolic(rec.sent, rec.send_chunk)}\n(chunk {rec.send_chunk})" if n <= 4 else f"chunk {rec.send_chunk}"
            ax.text(lx, ly, label, ha="center", va="center", fontsize=8, zorder=4,
                    bbox=dict(boxstyle="round,pad=0.2", fc="#fffbe6", ec="#bbbbbb", lw=0.8))
    title, subtitle = _step_title(recs[0], n)
    fig.text(0.5, 0.965, f"Ring all-reduce, N = {n}: {title}", ha="center", va="center", fontsize=14, weight="bold")
    fig.text(0.5, 0.925, subtitle, ha="center", va="center", fontsize=10.5)
    handles = [Patch(fc=colors[k], label=f"{rank_letter(k)}'s addend") for k in range(n)]
    handles += [Line2D([], [], color="#222222", lw=1.8, label="chunk sent"),
                Line2D([], [], color="#d62728", lw=1.8, ls="--", label="chunk received + added"),
                Line2D([], [], color="#1f77b4", lw=1.8, ls="--", label="chunk received, overwritten")]
    fig.legend(handles=handles, loc="lower center", ncol=(len(handles) + 1) // 2, fontsize=9, frameon=False)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})  # no version stamp: reruns give the same bytes
    plt.close(fig)


def render_walkthrough_figures(records, outdir, dpi=100, gif=True, frame_ms=1600):
    """Write one PNG per step (start, N-1 reduce-scatter, N-1 all-gather) of a recorded run into
    ``outdir`` and, with ``gif``, an animated ``walkthrough_animation.gif`` of them; returns the paths written."""
    n = _check(records)
    if n > MAX_FIGURE_RANKS:
        raise ValueError(f"figures are drawn for N <= {MAX_FIGURE_RANKS} ranks (got {n}); the tables work for any N")
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for i, name in enumerate(step_figure_names(n)):
        path = os.path.join(outdir, name)
        _draw_step(records, i, path, dpi)
        paths.append(path)
    if gif:
        paths.append(_write_gif(paths, os.path.join(outdir, "walkthrough_animation.gif"), frame_ms))
    return paths


def _write_gif(pngs, path, frame_ms):
    """Animated GIF of the step PNGs; the last frame (everything reduced) stays up twice as long."""
    from PIL import Image
    frames = [Image.open(p).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE) for p in pngs]
    durations = [frame_ms] * (len(frames) - 1) + [2 * frame_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)
    return path


# ---- Markdown --------------------------------------------------------------------------------------

def walkthrough_markdown_tables(records, image_dir="img"):
    """The doc's generated section: per step a heading, the figure and a table of what each rank
    sends, receives and holds afterwards (bold = the chunk this step changed, ✔ = fully reduced)."""
    n = _check(records)
    names = step_figure_names(n)
    letters = [rank_letter(k) for k in range(n)]
    full = (1 << n) - 1
    out = [f"Recorded from a real run of `ring_allreduce_inplace` on N = {n} ranks "
           f"({', '.join(letters)}); rank r's chunks start as the value 2**r, so every held value names "
           f"its addends (a3+d3 = 1 + 8 = 9)."]
    for i, name in enumerate(names):
        recs = [records[r][i] for r in range(n)]
        title, subtitle = _step_title(recs[0], n)
        out += ["", f"### {title[0].upper()}{title[1:]}", "", f"{subtitle[0].upper()}{subtitle[1:]}.", "",
                f"![{title}]({image_dir.rstrip('/') + '/' if image_dir else ''}{name})", ""]
        chunk_cols = " | ".join(f"chunk {c}" for c in range(n))
        if recs[0].phase == "start":
            out += [f"| rank | {chunk_cols} |", "|---" * (n + 1) + "|"]
        else:
            out += [f"| rank | sends | receives | {chunk_cols} |", "|---" * (n + 3) + "|"]
        for rec in recs:
            cells = []
            for c, v in enumerate(rec.holds):
                text = symbolic(v, c) + (" ✔" if v == full else "")
                cells.append(f"**{text}**" if rec.phase != "start" and c == rec.recv_chunk else text)
            if rec.phase == "start":
                out.append(f"| {letters[rec.rank]} | " + " | ".join(cells) + " |")
                continue
            src = records[rec.recv_from][i]
            send = f"{symbolic(rec.sent, rec.send_chunk)} → {letters[rec.send_to]}"
            recv = f"{symbolic(src.sent, rec.recv_chunk)} ← {letters[rec.recv_from]}"
            out.append(f"| {letters[rec.rank]} | {send} | {recv} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def replace_generated_section(text, section):
    """``text`` with everything between the GENERATED markers replaced by ``section``."""
    begin, end = text.find(GENERATED_BEGIN), text.find(GENERATED_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the document has no generated section: add the two lines\n{GENERATED_BEGIN}\n{GENERATED_END}")
    return text[:begin + len(GENERATED_BEGIN)] + "\n" + section + text[end:]


def extract_generated_section(text):
    """The text between the GENERATED markers (what ``replace_generated_section`` put there)."""
    begin, end = text.find(GENERATED_BEGIN), text.find(GENERATED_END)
    if begin < 0 or end < begin:
        raise ValueError("the document has no generated section")
    return text[begin + len(GENERATED_BEGIN) + 1:end]


def write_walkthrough_markdown(records, path, image_dir="img"):
    """Regenerate the tables section of the Markdown file ``path`` in place (the prose around the
    markers is kept); returns True if the file changed."""
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = replace_generated_section(old, walkthrough_markdown_tables(records, image_dir))
    if new != old:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != old
