"""Whether two PTX files of one .cu file hold the same code: the proof, without a GPU,
that a refactor of device code changes nothing (same PTX, same machine code).

    bash scripts/ptx_of.sh OLD_TREE /tmp/a FILE.cu   # sm_90a and compute_80, the build's flags
    bash scripts/ptx_of.sh .        /tmp/b FILE.cu
    python3 scripts/ptx_same.py /tmp/a/FILE.90.ptx /tmp/b/FILE.90.ptx   # and .80.ptx

Compares every .entry and .func by name. Before comparing it drops the .loc / .file
lines (source positions move with any edit), renames the labels in order of first use
and replaces the anonymous namespace's per-file name (it holds a hash of the path) and
the number of a function's local stack (__local_depotN counts the functions before it in
its file, so a kernel moved to another file changes N and nothing else).
Exit status 0 when every function is the same and both files define the same ones.

A refactor that renames kernels (a template parameter removed) maps the old names first:
    --sub REGEX REPL   applied to the whole of before.ptx (names, and the parameters named
                       after them), in order; repeatable
    --drop REGEX       before's functions whose (mapped) name matches are not compared
                       (instantiations the new tree no longer has); repeatable
    --new REGEX        after's functions whose name matches are not compared (instantiations
                       a change adds, e.g. a variant behind a knob); repeatable
e.g. the tma state passes' kOrder removed (fifteenth round), kOrder = 2 now the only order:
    --sub '(_tmaI\w*?)Li2E(?=EEv)' '\1' --drop '_tmaI\w*Li[013]EEEv'
and KDA's kHoist removed (a trailing bool: true kept, false marked first, then dropped):
    --sub '(kda_\w*state_kernel_tmaI\w*?)Lb0E(?=EEv)' '\1XdropE'
    --sub '(kda_\w*state_kernel_tmaI\w*?)Lb1E(?=EEv)' '\1' --drop Xdrop
"""

import re
import sys

ANON = re.compile(r"(\d+)?_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]{8}")
FUNC = re.compile(r"\.(?:entry|func)\s+(?:\([^)]*\)\s*)?(\S+?)\(")
LABEL = re.compile(r"\$L__\w+")
DEPOT = re.compile(r"__local_depot\d+")


def functions(path, subs=(), drops=()):
    text = ANON.sub("ANON", open(path).read())
    for pattern, repl in subs:
        text = re.sub(pattern, repl, text)
    out = {}
    for m in FUNC.finditer(text):
        end = text.find("\n}\n", m.start())
        if not any(re.search(d, m.group(1)) for d in drops):
            out[m.group(1)] = text[m.start():end + 3]
    return out


def normalised(body):
    lines = [line for line in body.split("\n") if not re.match(r"\s*\.(loc|file)\b", line)]
    labels = {}
    body = DEPOT.sub("__local_depot", "\n".join(lines))
    return LABEL.sub(lambda m: labels.setdefault(m.group(0), "L%d" % len(labels)), body)


def main(before, after, subs=(), drops=(), news=()):
    a, b = functions(before, subs, drops), functions(after, (), news)
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


def parse(argv):
    files, subs, drops, news, i = [], [], [], [], 0
    while i < len(argv):
        if argv[i] == "--sub":
            subs.append((argv[i + 1], argv[i + 2]))
            i += 3
        elif argv[i] == "--drop":
            drops.append(argv[i + 1])
            i += 2
        elif argv[i] == "--new":
            news.append(argv[i + 1])
            i += 2
        else:
            files.append(argv[i])
            i += 1
    if len(files) != 2:
        sys.exit(__doc__)
    return files[0], files[1], subs, drops, news


if __name__ == "__main__":
    before, after, subs, drops, news = parse(sys.argv[1:])
    sys.exit(main(before, after, subs, drops, news))
