"""``python -m client fingerprint DATALIST``: what this site would send for the federated plan, before it joins.

The fingerprint is computed by :func:`client.data.site_fingerprint.site_fingerprint`, exactly as the ClientApp
computes it when the server asks; this prints every key and value as they would leave the site.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from client.data.site_fingerprint import site_fingerprint
from shared.fingerprint import Fingerprint


def format_fingerprint(fingerprint: Fingerprint) -> Iterable[str]:
    """Lines for the console: every key and value exactly as they would leave the site."""
    for key, value in fingerprint.to_metrics().items():
        yield f"{key:36s} {value:.6g}" if isinstance(value, float) else f"{key:36s} {value}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datalist", type=Path, help="the site's datalist JSON")
    parser.add_argument("--num-classes", type=int, help="classes incl. background (default: the datalist's labels)")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")


def run(args: argparse.Namespace) -> int:
    fingerprint = site_fingerprint(args.datalist, num_classes=args.num_classes)
    if args.json:
        print(json.dumps(fingerprint.to_metrics(), indent=2, sort_keys=True))
    else:
        print(f"fingerprint of {args.datalist} ({fingerprint.cases} training cases); this is all it sends:")
        for line in format_fingerprint(fingerprint):
            print(f"  {line}")
    return 0
