"""Summarise a py-spy ``--format raw`` profile: top functions, inclusive and self.

Owns: reading collapsed stacks (``frame;frame;... count`` lines) and printing
the share of samples that pass through each function (inclusive) and that end
in it (self).  Never does: run py-spy itself (see ``fanout.py --profile``).

Usage:
    python bench/pyspy_top.py PROFILE.txt [--top 30]
"""

from __future__ import annotations

__all__ = ["summarise", "main"]

import argparse
import collections
import sys


def summarise(path: str) -> tuple:
    """Return (total_samples, inclusive Counter, self Counter) keyed "function (file)"."""
    inclusive: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            frames = [_key(frame) for frame in stack.split(";")]
            frames = [f for f in frames if not f.startswith(("thread (", "process "))]
            if not frames:
                continue
            total += samples
            for frame in set(frames):
                inclusive[frame] += samples
            leaf[frames[-1]] += samples
    return total, inclusive, leaf


def main(argv: list | None = None) -> int:
    """Print the top-N inclusive and self entries of one profile."""
    parser = argparse.ArgumentParser(prog="bench/pyspy_top.py", description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=30)
    opts = parser.parse_args(argv)
    total, inclusive, leaf = summarise(opts.profile)
    print("%d samples in %s" % (total, opts.profile))
    for title, counter in (("inclusive", inclusive), ("self", leaf)):
        print("--- %s" % title)
        for name, samples in counter.most_common(opts.top):
            print("%7d %5.1f%%  %s" % (samples, 100.0 * samples / max(1, total), name))
    return 0


# --- private ---


def _key(frame: str) -> str:
    """"func (path/file.py:123)" -> "func (file.py)"; native frames keep their library."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return "%s (%s)" % (name, where) if where else name


if __name__ == "__main__":
    sys.exit(main())
