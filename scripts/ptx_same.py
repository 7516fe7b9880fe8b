"""Whether two PTX files of one .cu file hold the same code: the proof, without a GPU,
that a refactor of device code changes nothing (same PTX, same machine code).

    nvcc <flags> -arch=sm_90a -ptx FILE.cu -o before.ptx   # on the old tree
    nvcc <flags> -arch=sm_90a -ptx FILE.cu -o after.ptx    # on the new one
    python3 scripts/ptx_same.py before.ptx after.ptx

Compares every .entry and .func by name. Before comparing it drops the .loc / .file
lines (source positions move with any edit), renames the labels in order of first use
and replaces the anonymous namespace's per-file name (it holds a hash of the path).
Exit status 0 when every function is the same and both files define the same ones.
"""

import re
import sys

ANON = re.compile(r"(\d+)?_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]{8}")
FUNC = re.compile(r"\.(?:entry|func)\s+(?:\([^)]*\)\s*)?(\S+?)\(")
LABEL = re.compile(r"\$L__\w+")


def functions(path):
    text = ANON.sub("ANON", open(path).read())
    out = {}
    for m in FUNC.finditer(text):
        end = text.find("\n}\n", m.start())
        out[m.group(1)] = text[m.start():end + 3]
    return out


def normalised(body):
    lines = [line for line in body.split("\n") if not re.match(r"\s*\.(loc|file)\b", line)]
    labels = {}
    return LABEL.sub(lambda m: labels.setdefault(m.group(0), "L%d" % len(labels)), "\n".join(lines))


def main(before, after):
    a, b = functions(before), functions(after)
    bad = 0
    if set(a) != set(b):
        bad += 1
        print("functions differ: only before", sorted(set(a) - set(b))[:5], "only after", sorted(set(b) - set(a))[:5])
    common = sorted(set(a) & set(b))
    for name in common:
        if normalised(a[name]) != normalised(b[name]):
            bad += 1
            print("DIFFERENT", name)
    print("%s: %d functions compared, %d differences" % (after, len(common), bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
