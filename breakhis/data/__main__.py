"""Check a BreakHis tree and make split manifests.

    python -m breakhis.data data/BreaKHis_v1                   # integrity report (rich tables)
    python -m breakhis.data data/BreaKHis_v1 --json            # the same, one JSON object on the last line
    python -m breakhis.data data/BreaKHis_v1 --split-ratio 70:10:20 --split-seed 0 --out split.json
    python -m breakhis.data data/BreaKHis_v1 --fold 1 --out fold1.json   # official protocol, val carved from train
    python -m breakhis.data data/BreaKHis_v1 --split-file split.json     # check a manifest
    python -m breakhis.data --download data                    # fetch and extract the archive, then report

Splits are by patient (or accession with --group accession), so no patient is on two sides; the
--magnification filter is applied afterwards, so one split serves every magnification. A manifest
lists kept images only: duplicates are dropped per --task. The settings are train.py's: the same
names, the same checks, the same pipeline (breakhis.data.prepare), so a manifest written here is
the one train.py would draw.
"""
from __future__ import annotations

import argparse
import json

from ..config import make_config
from ..errors import UserError, guard
from ..io import write_json
from .dataset import HINT, URL
from .download import download_and_extract
from .integrity import integrity_report, render_report, render_split
from .prepare import choose_split, load_tree, near_pairs, usable_records
from .splits import split_counts

# flag -> TrainConfig setting (None: the setting's default); the flags train.py takes under the same names
SETTINGS = ("split_ratio", "split_seed", "group", "fold", "val_fraction", "task", "magnification", "split_file",
            "skip_bad", "near_duplicates", "cache_dir", "cache_size", "workers")


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m breakhis.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", help="BreaKHis_v1, its parent, or the Kaggle mirror's folder")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    ap.add_argument("--split-ratio", "--split", dest="split_ratio",
                    help="train:val:test percentages of images, split by patient (default 60:10:30)")
    ap.add_argument("--split-seed", "--seed", dest="split_seed", help="seed of the split search (default 0)")
    ap.add_argument("--group", help="split unit: patient (default) or accession")
    ap.add_argument("--fold", help="official fold 1..5 (Folds.csv or mkfold/dsfold<N>.txt)")
    ap.add_argument("--val-fraction", help="--fold: share of train units moved to val (default 0.1)")
    ap.add_argument("--task", help="binary (default) or subtype: decides which duplicates are dropped")
    ap.add_argument("--magnification", help="40, 100, 200, 400 or all: shown split counts")
    ap.add_argument("--out", help="write the split manifest here (JSON)")
    ap.add_argument("--split-file", help="check an existing manifest against this tree")
    ap.add_argument("--skip-bad", action="store_true", default=None,
                    help="skip unreadable images (recorded in the manifest)")
    ap.add_argument("--near-duplicates", help="link (default): verified near-duplicate fields keep their patients on "
                                              "one side; report: listed only; off: not searched (docs/data.md)")
    ap.add_argument("--cache-dir", help="decode cache folder (default: ~/.cache/breakhis)")
    ap.add_argument("--cache-size", help="cached field size HxW (default: the size for 224 px inputs)")
    ap.add_argument("--workers", help="decoding processes (0: one per core)")
    ap.add_argument("--download", metavar="DIR", help=f"fetch and extract {URL} into DIR, then report")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    given = {k: getattr(a, k) for k in SETTINGS if getattr(a, k) is not None}
    # every option is checked (TrainConfig.validate) before the download or the decode
    cfg = make_config({"class_weights": "none"}, given)
    if a.download:
        root = download_and_extract(URL, a.download, progress=not a.json)
    elif a.root:
        root = a.root
    else:
        raise UserError(f"give the data folder (python -m breakhis.data data/BreaKHis_v1), or {HINT}")
    cfg = make_config({"data": str(root)}, base=cfg)
    index, cache = load_tree(cfg, progress=not a.json)
    near, near_note = near_pairs(cache, index.records, make_config({"split_file": ""}, base=cfg))
    rep = integrity_report(index, cache.info, cache.paths, skip_bad=cfg.skip_bad, near=near, near_note=near_note,
                           near_mode=cfg.near_duplicates)
    manifest, records, refused = None, [], None
    if not rep["unreadable"] or cfg.skip_bad:
        records, skipped, dropped = usable_records(index, cache, cfg.task, cfg.skip_bad)
        if cfg.split_file or cfg.fold or a.split_ratio or a.out:
            kept = {r.path for r in records}
            try:
                manifest = choose_split(index.root, records, cfg, skipped=skipped, dropped=dropped,
                                        near=[x for x in near if set(x["paths"]) <= kept])
            except UserError as e:  # the report first (it shows the groups), then the one line
                refused = e
            if a.out and manifest is not None:
                write_json(a.out, manifest)
    if a.json:
        if manifest is not None:
            rep["split"] = {"file": a.out or cfg.split_file,
                            "counts": manifest.get("counts") or split_counts(records, manifest)}
        print(json.dumps(rep))
    else:
        render_report(rep)
        if manifest is not None:
            render_split(manifest, records, cfg.magnification)
            if a.out:
                print(f"wrote {a.out}")
    if refused is not None:
        raise refused
    if rep["unreadable"] and not cfg.skip_bad:
        listing = "; ".join(f"{u['path']} ({u['error']})" for u in rep["unreadable"])
        raise UserError(f"{len(rep['unreadable'])} unreadable image(s) under {index.root}: {listing}: "
                        f"re-extract or replace them, or pass --skip-bad to leave them out (recorded in the manifest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
