"""Wait until a running Ray cluster's live nodes hold the resources named, e.g. GPU=2.

    ray submit cluster/ray-cluster.yaml cluster/wait-resources.py GPU=2

raymerge sizes a merge from the nodes alive when it starts, and `ray up` returns before its
workers have joined: run this between the two. Exits 0 once the cluster has them, 1 when
--timeout passes first (saying what the cluster has).
"""

import argparse
import sys
import time

import ray


def _wanted(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    try:
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RESOURCE=AMOUNT (e.g. GPU=2)") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wanted", nargs="+", type=_wanted, metavar="RESOURCE=AMOUNT")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    parser.add_argument("--address", default="auto", help="the cluster (default: auto)")
    args = parser.parse_args()
    ray.init(address=args.address, logging_level="ERROR")
    deadline = time.monotonic() + args.timeout
    while True:
        have = ray.cluster_resources()
        missing = [f"{name}={amount:g}" for name, amount in args.wanted if have.get(name, 0) < amount]
        if not missing:
            print("wait-resources: the cluster has " + ", ".join(f"{n}={have[n]:g}" for n, _ in args.wanted))
            return 0
        left = deadline - time.monotonic()
        if left <= 0:
            held = ", ".join(f"{n}={have.get(n, 0):g}" for n, _ in args.wanted)
            print(f"wait-resources: still short of {', '.join(missing)} after {args.timeout:g} s "
                  f"(the cluster has {held})", file=sys.stderr)
            return 1
        time.sleep(min(5.0, left))


if __name__ == "__main__":
    sys.exit(main())
