"""The integrity report of a BreakHis tree: counts, strays, unreadable files, modes, sizes, duplicates.

    python -m breakhis.data data/BreaKHis_v1          # prints it (see breakhis/data/__main__.py)
"""
from __future__ import annotations

from collections import Counter

from rich import box
from rich.console import Console
from rich.table import Table

from .dataset import CLASSES, FULL, MAGNIFICATIONS, PARTS, SUBTYPES, Index, Record, drop_duplicates, find_duplicates
from .near import describe, groups, max_group
from .splits import part_records


def cross_subtype_ids(records: list[Record]) -> list[dict]:
    """Numeric slide ids (Record.accession) that appear under more than one subtype code."""
    by_id: dict[str, set[str]] = {}
    for r in records:
        by_id.setdefault(r.accession, set()).add(r.patient)
    return [{"accession": k, "patients": sorted(v)} for k, v in sorted(by_id.items())
            if len({q.split("-", 1)[0] for q in v}) > 1]


def pixel_facts(rep: dict, recs: list, paths: list[str], info: list[dict], notes: list[str]) -> None:
    """The decoder's facts into rep (and their lines into notes): unreadable files, converted modes,
    sizes, and pixel-identical duplicates across patients with what each task drops of them."""
    if len(info) != len(paths):
        raise ValueError(f"info has {len(info)} entries for {len(paths)} paths")
    ok = [(p, i) for p, i in zip(paths, info) if i["ok"]]
    rep["unreadable"] = [{"path": p, "error": i.get("error")} for p, i in zip(paths, info) if not i["ok"]]
    rep["modes"] = dict(Counter(i["mode"] for _, i in ok if i["mode"] != "RGB"))
    sizes = Counter(f"{i['width']}x{i['height']}" for _, i in ok)
    rep["sizes"] = dict(sizes.most_common())
    common = sizes.most_common(1)[0][0] if sizes else None
    rep["odd_sizes"] = [{"path": p, "size": f"{i['width']}x{i['height']}"} for p, i in ok
                        if f"{i['width']}x{i['height']}" != common]
    groups = find_duplicates(recs, {p: i["sha1"] for p, i in ok})
    by_path = {r.path: r for r in recs}
    pairs = Counter()
    for g in groups:
        pats = sorted({by_path[p].patient for p in g})
        conflict = [t for t, f in (("binary", "cls"), ("subtype", "subtype"))
                    if len({getattr(by_path[p], f) for p in g}) > 1]
        rep["duplicates"].append({"paths": g, "patients": pats, "conflicting_labels": conflict})
        pairs[(tuple(pats), tuple(conflict))] += 1
    rep["duplicate_patients"] = [{"patients": list(p), "images": k, "conflicting_labels": list(c)}
                                 for (p, c), k in sorted(pairs.items())]
    kept = [r for r in recs if r.path not in {u["path"] for u in rep["unreadable"]}]
    rep["dropped"] = {t: len(drop_duplicates(kept, groups, t)[1]) for t in ("binary", "subtype")}
    for d in rep["duplicate_patients"]:
        notes.append(f"{' = '.join(d['patients'])} share {d['images']} pixel-identical image(s)"
                     + (f" with conflicting {'/'.join(d['conflicting_labels'])} labels" if d["conflicting_labels"] else ""))
    if groups:
        notes.append(f"duplicates dropped per task: binary {rep['dropped']['binary']} (one copy kept), "
                     f"subtype {rep['dropped']['subtype']} (conflicting copies all dropped)")
    if rep["modes"]:
        notes.append(f"{sum(rep['modes'].values())} non-RGB image(s) converted to RGB "
                     f"({', '.join(f'{k} {v}' for k, v in rep['modes'].items())})")
    if rep["odd_sizes"]:
        notes.append(f"{len(rep['odd_sizes'])} image(s) not {common} px (accepted; resized by the cache)")


def integrity_report(index: Index, info: list[dict] | None = None, paths: list[str] | None = None,
                     skip_bad: bool = False, near: list[dict] | None = None, near_note: str = "",
                     near_mode: str = "link") -> dict:
    """JSON-able facts about a tree: counts per class x subtype x magnification, patients per subtype,
    strays, and, given the decoder's `info` (aligned with `paths`, default the index's paths),
    unreadable files, converted modes, odd sizes and pixel-identical duplicates across patients.
    near: verified near-duplicate pairs (near.cache_pairs), listed with the groups of patients they link
    (near_groups) and whether --near-duplicates (near_mode) links them."""
    recs = index.records
    paths = [r.path for r in recs] if paths is None else paths
    counts = {}
    for s in SUBTYPES:
        rs = [r for r in recs if r.subtype == s]
        mags = Counter(r.magnification for r in rs)
        counts[s] = {"class": CLASSES[int(s in SUBTYPES[4:])], **{str(m): mags[m] for m in MAGNIFICATIONS},
                     "images": len(rs), "patients": len({r.patient for r in rs})}
    classes = {c: {"images": sum(r.cls == c for r in recs), "patients": len({r.patient for r in recs if r.cls == c})}
               for c in CLASSES}
    rep = {"root": str(index.root), "images": len(recs), "patients": len(index.patients), "classes": classes,
           "magnifications": {str(m): sum(r.magnification == m for r in recs) for m in MAGNIFICATIONS},
           "counts": counts, "strays": index.strays, "checked_pixels": info is not None, "skip_bad": skip_bad,
           "unreadable": [], "modes": {}, "sizes": {}, "odd_sizes": [], "duplicates": [], "duplicate_patients": [],
           "dropped": {}, "cross_subtype_ids": cross_subtype_ids(recs), "near_duplicates": list(near or [])}
    exact = {tuple(sorted(g)) for g in find_duplicates(recs, {p: i["sha1"] for p, i in zip(paths, info) if i["ok"]})} \
        if info is not None else set()
    rep["near_duplicates"] = [x for x in rep["near_duplicates"] if tuple(sorted(x["paths"])) not in exact]
    rep["near_groups"], rep["near_mode"] = groups(rep["near_duplicates"], recs), near_mode
    notes = []
    if rep["near_duplicates"]:
        g, limit = rep["near_groups"], max_group(len(index.patients))
        fate = {"link": "their patients stay on one side of every split",
                "report": "listed only, not kept together (--near-duplicates report)"}[near_mode]
        notes.append(f"{len(rep['near_duplicates'])} verified near-duplicate field pair(s) across patients (e.g. "
                     f"{' ~ '.join(rep['near_duplicates'][0]['paths'])}) in {len(g)} group(s) of patients, the largest "
                     f"{describe(g[0])}: {fate}")
        if g[0]["size"] > limit and near_mode == "link":
            notes.append(f"a near-duplicate group joins more than {limit} patients: a split refuses it; pass "
                         f"--near-duplicates report (listed, not linked) or off")
    notes += [near_note] if near_note else []
    notes += [f"slide id {c['accession']} is filed under {len(c['patients'])} subtypes ({', '.join(c['patients'])}): "
             f"--group accession keeps them on one side of a split" for c in rep["cross_subtype_ids"]]
    if info is not None:
        pixel_facts(rep, recs, paths, info, notes)
    if len(recs) > 5000 or len(index.patients) > 60:  # looks like the full archive: compare with its facts
        found = {"patients": len(index.patients), "images": len(recs), "benign": classes["benign"]["images"],
                 "malignant": classes["malignant"]["images"]}
        diff = [f"{k} {found[k]:,} (the archive has {v:,})" for k, v in FULL.items() if found[k] != v]
        rep["full_dataset"] = {"expected": FULL, "found": found, "matches": not diff}
        if diff:
            notes.append("looks like the full BreakHis archive but counts differ: " + ", ".join(diff)
                         + "; was the extraction complete?")
    bad = rep["unreadable"]
    if bad and not skip_bad:
        verdict = f"FAIL: {len(bad)} unreadable image(s); replace them or pass --skip-bad"
    else:
        verdict = (f"OK: {len(recs) - len(bad):,} usable images of {len(index.patients)} patients "
                   f"({classes['benign']['images']:,} benign, {classes['malignant']['images']:,} malignant)")
        if bad:
            notes.insert(0, f"{len(bad)} unreadable image(s) skipped (--skip-bad)")
        if info is None:
            notes.append("pixels not checked")
    rep["notes"], rep["verdict"] = notes, verdict + "".join(f"; {n}" for n in notes)
    return rep


def render_report(rep: dict, console=None) -> None:
    """Print the report as rich tables and a verdict line."""
    con = console or Console()
    t = Table(title=f"BreakHis images under {rep['root']}", box=box.SIMPLE)
    for col in ("class / subtype", *(f"{m}X" for m in MAGNIFICATIONS), "images", "patients"):
        t.add_column(col, justify="left" if col.startswith("class") else "right", no_wrap=True)
    for s, c in rep["counts"].items():
        if s in (SUBTYPES[0], SUBTYPES[4]):
            cls = rep["classes"][c["class"]]
            t.add_row(c["class"], "", "", "", "", f"{cls['images']:,}", str(cls["patients"]), style="bold")
        t.add_row(f"  {s}", *(f"{c[str(m)]:,}" for m in MAGNIFICATIONS), f"{c['images']:,}", str(c["patients"]))
    t.add_row("all", *(f"{rep['magnifications'][str(m)]:,}" for m in MAGNIFICATIONS), f"{rep['images']:,}",
              str(rep["patients"]), style="bold")
    con.print(t)
    if rep["duplicate_patients"]:
        d = Table(title="pixel-identical images across patients", box=box.SIMPLE)
        for col in ("patients", "images", "conflicting labels"):
            d.add_column(col)
        for row in rep["duplicate_patients"]:
            d.add_row(" = ".join(row["patients"]), str(row["images"]), ", ".join(row["conflicting_labels"]) or "none")
        con.print(d)
    if rep.get("near_groups"):
        g = Table(title=f"patients linked by near-duplicate fields (--near-duplicates {rep.get('near_mode', 'link')})",
                  box=box.SIMPLE)
        for col in ("patients", "benign", "malignant", "verified pairs", "members"):
            g.add_column(col, justify="left" if col == "members" else "right")
        for row in rep["near_groups"][:10]:
            members = ", ".join(row["patients"][:6]) + (f", ... {row['size'] - 6} more" if row["size"] > 6 else "")
            g.add_row(str(row["size"]), str(row["classes"]["benign"]), str(row["classes"]["malignant"]),
                      f"{row['pairs']:,}", members)
        con.print(g)
    problems = [("unreadable", [f"{u['path']} ({u['error']})" for u in rep["unreadable"]]),
                ("converted to RGB", [f"{k}: {v}" for k, v in rep["modes"].items()]),
                ("other sizes", [f"{o['path']} ({o['size']})" for o in rep["odd_sizes"]]),
                ("stray files (ignored)", rep["strays"])]
    if any(items for _, items in problems):
        p = Table(title="problems", box=box.SIMPLE)
        for col in ("kind", "count", "files"):
            p.add_column(col)
        for kind, items in problems:
            if items:
                p.add_row(kind, str(len(items)), "\n".join(items[:5] + ([f"... {len(items) - 5} more"] if len(items) > 5 else [])))
        con.print(p)
    con.print(rep["verdict"], style="bold red" if rep["verdict"].startswith("FAIL") else "bold green", markup=False)


def render_split(manifest: dict, records: list[Record], magnification: int | None, console=None) -> None:
    """Print a manifest's partitions (optionally at one magnification) as a rich table."""
    how = f"fold {manifest['fold']}" if manifest.get("fold") else ":".join(map(str, manifest.get("ratio") or ()))
    t = Table(title=f"split ({how}, seed {manifest.get('seed')}, by {manifest.get('group', 'patient')}, "
                    f"task {manifest.get('task', 'binary')}, "
                    f"magnification {magnification or 'all'})", box=box.SIMPLE)
    for col in ("part", "patients", "images", "fraction", "benign", "malignant", "subtypes"):
        t.add_column(col, justify="left" if col == "part" else "right")
    parts = {p: part_records(records, manifest, p, magnification or "all") for p in PARTS}
    total = max(1, sum(map(len, parts.values())))
    for p, rs in parts.items():
        t.add_row(p, str(len({r.patient for r in rs})), f"{len(rs):,}", f"{len(rs) / total:.3f}",
                  f"{sum(r.label == 0 for r in rs):,}", f"{sum(r.label == 1 for r in rs):,}",
                  str(len({r.subtype for r in rs})))
    (console or Console()).print(t)
