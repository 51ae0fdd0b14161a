"""python -m sparkml_dist.spool SPOOL_URL --tracking-uri URI --run-id RUN: deliver a spool by hand.

The command lives here, not in the spool module, because it sends through ``tracking``, and ``tracking``
imports the spool: the module imported by both stays free of either's import of the other.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sparkml_dist.experiments import tracking
from sparkml_dist.experiments.spool import deliver, pending


def main(argv: list[str] | None = None) -> int:
    """python -m sparkml_dist.spool SPOOL_URL --tracking-uri URI --run-id RUN: deliver a spool by hand."""
    parser = argparse.ArgumentParser(
        prog="python -m sparkml_dist.spool",
        description="Deliver a training run's spooled metrics to its tracking server.",
    )
    parser.add_argument("spool_url")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    run = tracking.RunHandle(args.tracking_uri, "", args.run_id, spool_url=args.spool_url)
    sent = deliver(args.spool_url, lambda rows: tracking.send_rows(run, rows))
    print(json.dumps({"delivered": sent, "left": len(pending(args.spool_url))}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
