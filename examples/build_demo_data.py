"""Build the offline demo set: real flags and named photographs with entity-labelled captions.

    python examples/build_demo_data.py --output examples/data
    python examples/build_demo_data.py --output /tmp/small --n-flags 20 --views 4

Writes OUTPUT/{train,val,test}.jsonl (eclip's generic JSONL format) and OUTPUT/images/,
replacing an earlier demo set there (never another folder). Where the images come from and
under which licences: examples/DATA.md. Prints a JSON summary (paths, counts, bytes) on stdout.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="build_demo_data.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write (replaced if it holds an earlier demo set)")
    parser.add_argument("--n-flags", type=int, default=None, help="use this many of the 195 flags (default: all)")
    parser.add_argument("--views", type=int, default=6,
                        help="image views per entity: views 4 and 5 go to val and test (the last two when fewer than 6), "
                             "the others to train (default: 6; the demo builds 8)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same files (default: 0)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square JPEG views (default: 128)")
    parser.add_argument("--no-photos", action="store_true", help="flags only")
    args = parser.parse_args(argv)

    from eclip.console import print_json
    from eclip.data.demo_set import build_demo_set
    from eclip.errors import EclipError
    try:
        result = build_demo_set(args.output, n_flags=args.n_flags, views_per_entity=args.views, seed=args.seed,
                                image_size=args.image_size, include_photos=not args.no_photos)
    except EclipError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    print_json({k: (str(v) if k not in ("counts", "bytes") else v) for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
