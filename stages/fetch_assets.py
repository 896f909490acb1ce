"""Stage fetch_assets (a local rule: it runs where there is internet): download, resume and check
the files a row needs (datasets, teacher pickles, Inception, VGG16) into the assets folder."""

import argparse
import json

from stages.files import assets

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help="the `assets` config section as JSON")
p.add_argument("--names", nargs="+", required=True, help="catalog or folder names to fetch (stages/files/assets.py)")
p.add_argument("--row-needs", nargs="*", default=[], help="the row's other assets (listed too when offline)")
args = p.parse_args()
assets.fetch(args.names, args.config, log=lambda msg: print(msg, flush=True), row_needs=args.row_needs)
