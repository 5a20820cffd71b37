"""Where a kernel's instructions and stall samples go, from Nsight Compute's source page: by opcode, by stall
reason, and the top instructions (docs/fp8.md quotes these for the FP8 kernels).

    ncu --import prof.ncu-rep --page source --csv --print-source sass > prof.sass.csv
    python experiments/ncu_hotspots.py prof.sass.csv[.gz] [TOP]
"""
import collections
import csv
import gzip
import sys

SAMPLES, EXECUTED = "Warp Stall Sampling (All Samples)", "Instructions Executed"


def read(path):
    """(header, rows) of the CSV (its first line names the kernel)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        rows = list(csv.reader(f))
    return rows[1], rows[2:]


def opcode(sass):
    """LDG.E.128 -> LDG.E, FADD.FTZ -> FADD; a predicate (@P0) skipped."""
    words = [w for w in sass.split() if not w.startswith("@")]
    if not words:
        return ""
    parts = words[0].split(".")
    return ".".join(parts[:2]) if parts[0].startswith(("LD", "ST")) and len(parts) > 1 else parts[0]


def report(path, top=12):
    header, rows = read(path)
    col = {h: i for i, h in enumerate(header)}

    def num(row, key):
        text = row[col[key]].replace(",", "")
        return float(text) if text.replace(".", "", 1).isdigit() else 0.0
    samples = sum(num(r, SAMPLES) for r in rows) or 1.0
    executed = sum(num(r, EXECUTED) for r in rows) or 1.0
    lines = [f"{path}: {samples:.0f} stall samples, {executed:.0f} warp instructions executed",
             "opcode: share of instructions executed | of stall samples"]
    by_exec, by_samples = collections.Counter(), collections.Counter()
    for r in rows:
        op = opcode(r[col["Source"]])
        by_exec[op] += num(r, EXECUTED)
        by_samples[op] += num(r, SAMPLES)
    for op, v in by_exec.most_common(22):
        lines.append(f"  {op:12s} {v / executed * 100:5.1f}%  | {by_samples[op] / samples * 100:5.1f}%")
    reasons = {h[len("stall_"):]: sum(num(r, h) for r in rows) for h in header
               if h.startswith("stall_") and "Not Issued" not in h}
    lines.append("stall reasons: " + ", ".join(f"{k} {v / samples * 100:.0f}%" for k, v in
                                             sorted(reasons.items(), key=lambda kv: -kv[1])[:8]))
    for r in sorted(rows, key=lambda r: -num(r, SAMPLES))[:top]:
        lines.append(f"  {num(r, SAMPLES) / samples * 100:5.1f}%  executed {num(r, EXECUTED):9.0f}  "
                     f"{r[col['Address']][-5:]}  {r[col['Source']].strip()[:70]}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    print(report(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12))
