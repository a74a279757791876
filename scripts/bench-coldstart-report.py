#!/usr/bin/env python3
"""Helpers of scripts/bench-coldstart.sh.

bound REG REF LIST WORKLOAD
    Bytes a perfect lazy puller must move for WORKLOAD: the manifest, the config, every layer's
    TOC region (TOC + footer) and the compressed chunks of the files in LIST (paths as in the
    layers; each file counted in the topmost layer that has it), read from the eStargz TOCs of
    REF. Prints one JSON line.

report DIR MARKDOWN PNG REPS
    Medians of DIR/results.jsonl per (network, workload, mode) with the physical bound, as a
    markdown section "coldstart" of MARKDOWN and a stacked bar chart PNG.

soci DIR MARKDOWN REPS
    Medians of DIR/results-soci.jsonl: SOCI-indexed unmodified images against our eStargz
    conversion and the full pull (issue 18's targets), as section "coldstart-soci" of MARKDOWN.
"""
import gzip
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import urllib.request
from collections import defaultdict
from datetime import datetime, timezone

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
# Round trips of an ideal lazy start: TCP connect, manifest, config + TOCs (in parallel), data.
ROUND_TRIPS = 4
NETS = {"loopback": (None, 0.0), "1gbit-2ms": (1e9, 2.0), "100mbit-20ms": (100e6, 20.0)}
MODES = ["overlayfs", "stargz", "lazypull", "lazypull-prio", "lazypull-soci"]
MODE_NAMES = {
    "overlayfs": "containerd overlayfs (full pull)",
    "stargz": "Go stargz-snapshotter 0.12",
    "lazypull": "lazypull",
    "lazypull-prio": "lazypull, prioritized",
    "lazypull-soci": "lazypull, SOCI index (unmodified gzip image)",
}


def get(url, headers=None, rng=None):
    req = urllib.request.Request(url, headers=headers or {})
    if rng:
        req.add_header("Range", "bytes=%d-%d" % rng)
    with urllib.request.urlopen(req) as r:
        return r.read()


def toc_of(reg, repo, layer):
    size = layer["size"]
    footer = get("http://%s/v2/%s/blobs/%s" % (reg, repo, layer["digest"]), rng=(size - 51, size - 1))
    at = footer.find(b"STARGZ")
    if at < 16:
        raise SystemExit("layer %s is not eStargz (no footer)" % layer["digest"])
    toc_off = int(footer[at - 16:at], 16)
    region = get("http://%s/v2/%s/blobs/%s" % (reg, repo, layer["digest"]), rng=(toc_off, size - 1))
    with tarfile.open(fileobj=io.BytesIO(gzip.GzipFile(fileobj=io.BytesIO(region)).read())) as t:
        toc = json.load(t.extractfile("stargz.index.json"))
    return toc_off, size - toc_off, toc


def file_spans(toc, toc_off):
    """Compressed bytes per regular file: each chunk spans from its offset to the next offset."""
    offs = sorted({e["offset"] for e in toc["entries"] if e.get("offset")} | {toc_off})
    nxt = {a: b for a, b in zip(offs, offs[1:])}
    spans = defaultdict(int)
    for e in toc["entries"]:
        if e["type"] in ("reg", "chunk") and e.get("offset"):
            spans[e["name"].lstrip("./")] += nxt[e["offset"]] - e["offset"]
    return spans


def bound(reg, ref, listfile, workload):
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    mbytes = get("http://%s/v2/%s/manifests/%s" % (reg, repo, tag), {"Accept": ACCEPT})
    m = json.loads(mbytes)
    wanted = [l.strip().lstrip("./") for l in open(listfile) if l.strip()]
    tocs = []
    toc_bytes = 0
    for layer in m["layers"]:
        off, n, toc = toc_of(reg, repo, layer)
        toc_bytes += n
        tocs.append(file_spans(toc, off))
    data = 0
    for f in wanted:
        for spans in reversed(tocs):
            if f in spans:
                data += spans[f]
                break
    print(json.dumps({"workload": workload, "manifest_bytes": len(mbytes), "config_bytes": m["config"]["size"],
                      "toc_bytes": toc_bytes, "data_bytes": data, "files": len(wanted),
                      "image_bytes": sum(l["size"] for l in m["layers"])}))


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def md_section(md, name, body):
    subprocess.run([sys.argv[0].replace("bench-coldstart-report.py", "md-section.sh"), md, name], input=body.encode(), check=True)


def medians(rows):
    runs = defaultdict(list)
    for r in rows:
        runs[(r["net"], r["workload"], r["mode"])].append(r)
    med = {}
    for k, rs in runs.items():
        med[k] = {f: statistics.median(r[f] for r in rs) for f in ("pull", "create", "run", "bytes")}
        med[k]["total"] = statistics.median(r["pull"] + r["create"] + r["run"] for r in rs)
        med[k]["n"] = len(rs)
    return med


def soci(d, md, reps):
    med = medians(load(d + "/results-soci.jsonl"))
    nets = [n for n in NETS if any(k[0] == n for k in med)]
    wls = [w for w in ("busybox-echo", "debian-script", "big-5pct", "big-all") if any(k[1] == w for k in med)]
    out = ["## Cold start through a SOCI index (`scripts/bench-coldstart.sh` with `MODES=\"overlayfs lazypull "
           "lazypull-soci\" RESULTS=results-soci.jsonl REPORT=soci`, REPS=%s, medians)\n" % reps]
    out.append("Measured by `make bench` on %s, %s cores, the same containerd, cold runs and links as the section "
               "above, in one run. `lazypull-soci` runs the **unmodified** gzip image (its digest unchanged) with "
               "a v1 SOCI index made by `lazypull soci create` (%s-byte spans, layers under 10 MiB not indexed, "
               "as upstream: the snapshotter fetches those whole and indexes them itself); `lazypull` runs our eStargz conversion of the same image; "
               "overlayfs is containerd's full pull of the same unmodified image.\n" % (
                   datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                   subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
                   os.environ.get("SOCI_SPAN", "4194304")))
    out.append("| link | workload | mode | pull (s) | create (s) | run (s) | **total (s)** | registry MB |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for net in nets:
        for wl in wls:
            for mode in ("overlayfs", "lazypull", "lazypull-soci"):
                m = med.get((net, wl, mode))
                if m:
                    out.append("| %s | %s | %s | %.2f | %.2f | %.2f | **%.2f** | %.1f |" % (
                        net, wl, MODE_NAMES[mode], m["pull"], m["create"], m["run"], m["total"], m["bytes"] / 1e6))
    out.append("")
    out.append("Targets of issue 18: SOCI ≤ 1.3× our eStargz mode on every workload; read-all never slower "
               "than the full pull.\n")
    out.append("| link | workload | SOCI / eStargz (≤ 1.3) | SOCI / full pull | met |")
    out.append("| --- | --- | ---: | ---: | --- |")
    for net in nets:
        for wl in wls:
            s, e, o = (med.get((net, wl, m)) for m in ("lazypull-soci", "lazypull", "overlayfs"))
            if not (s and e and o):
                continue
            r_e, r_o = s["total"] / e["total"], s["total"] / o["total"]
            ok = r_e <= 1.3 and (wl != "big-all" or r_o <= 1.0)
            out.append("| %s | %s | %.2f | %.2f | %s |" % (net, wl, r_e, r_o, "yes" if ok else "**no**"))
    out.append("")
    out.append("Raw runs: `.work/bench-cold/results-soci.jsonl` (one JSON line per run).\n")
    md_section(md, "coldstart-soci", "\n".join(out) + "\n")


def report(d, md, png, reps):
    med = medians(load(d + "/results.jsonl"))
    bounds = {b["workload"]: b for b in load(d + "/bound.jsonl")}
    warm = {w["workload"]: w for w in load(d + "/warm.jsonl")}
    nets = [n for n in NETS if any(k[0] == n for k in med)]
    wls = [w for w in ("busybox-echo", "debian-script", "big-5pct", "big-all") if any(k[1] == w for k in med)]

    def phys(net, wl):
        b = bounds[wl]
        bw, rtt = NETS[net]
        nbytes = b["manifest_bytes"] + b["config_bytes"] + b["toc_bytes"] + b["data_bytes"]
        net_s = (nbytes * 8 / bw if bw else 0.0) + ROUND_TRIPS * rtt / 1000.0
        return net_s + warm[wl]["warm_create"] + warm[wl]["warm_run"], nbytes

    out = []
    out.append("## Cold start, hello-bench style (`scripts/bench-coldstart.sh`, REPS=%s, medians)\n" % reps)
    out.append("Measured by `make bench` on %s, %s cores. One private containerd 1.6 (runc) with three "
               "snapshotters; each run is cold (images, snapshots and snapshotter caches wiped, page cache "
               "dropped). **pull** = `ctr image pull` / `ctr-remote image rpull` / `lazypull rpull`; "
               "**create** = `ctr container create`; **run** = `ctr task start` until the workload exits. "
               "Registry bytes from the registry's access log. Links: loopback, and a registry in a network "
               "namespace whose lo has a `tbf` qdisc (bandwidth) behind `lazypull-linkem` (round-trip "
               "latency; netem is not available here).\n" % (datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                                                           subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()))
    out.append("Workloads: `busybox-echo` (`/bin/echo hello` on a 1-layer busybox image), `debian-script` "
               "(`dpkg -l`, `apt-get --version`, `gzip --version`, `ls -lR /usr/share/doc` on Debian minbase), "
               "`big-5pct` (read one 25 MiB file of test/big:1, ≈5%), `big-all` (read all 500 MiB of its data "
               "files). `lazypull-prio`: the image rebuilt by `lazypull image convert --prioritize` with the "
               "files a recording run opened (the layer daemons' `opened_files`).\n")
    out.append("**Physical bound** = (manifest + config + TOCs + compressed chunks of the files the workload "
               "opens) / bandwidth + %d round trips + the warm floor (the same `create` + `run` with the image "
               "local and the page cache warm, overlayfs), i.e. what a perfect lazy puller would need.\n" % ROUND_TRIPS)
    out.append("| link | workload | mode | pull (s) | create (s) | run (s) | **total (s)** | registry MB | vs stargz | bound (s) | vs bound |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    targets = []
    for net in nets:
        for wl in wls:
            pb, pbytes = phys(net, wl)
            sz = med.get((net, wl, "stargz"))
            for mode in MODES:
                m = med.get((net, wl, mode))
                if not m:
                    continue
                vs_sz = "%.2f×" % (m["total"] / sz["total"]) if sz and mode != "stargz" else "–"
                vs_b = "%.2f×" % (m["total"] / pb) if mode.startswith("lazypull") else "–"
                out.append("| %s | %s | %s | %.2f | %.2f | %.2f | **%.2f** | %.1f | %s | %.2f | %s |" % (
                    net, wl, MODE_NAMES[mode], m["pull"], m["create"], m["run"], m["total"], m["bytes"] / 1e6,
                    vs_sz, pb, vs_b))
                if mode == "lazypull" and net != "loopback":
                    targets.append((net, wl, m["total"], sz["total"] if sz else None, pb))
    out.append("")
    out.append("Targets of issue #6 on the shaped links (lazypull, not prioritized):\n")
    out.append("| link | workload | lazypull / stargz (≤ 0.8) | lazypull / bound (≤ 1.5) |")
    out.append("| --- | --- | ---: | ---: |")
    for net, wl, t, s, pb in targets:
        out.append("| %s | %s | %s | %.2f |" % (net, wl, "%.2f" % (t / s) if s else "–", t / pb))
    out.append("")
    out.append("Read-everything workload against the full pull (target: no slower):\n")
    out.append("| link | overlayfs total (s) | lazypull total (s) | ratio |")
    out.append("| --- | ---: | ---: | ---: |")
    for net in nets:
        o, l = med.get((net, "big-all", "overlayfs")), med.get((net, "big-all", "lazypull"))
        if o and l:
            out.append("| %s | %.2f | %.2f | %.2f |" % (net, o["total"], l["total"], l["total"] / o["total"]))
    out.append("")
    out.append("Bound inputs per workload (bytes): " + "; ".join(
        "%s: TOCs %d + data %d of %d (%d files)" % (wl, bounds[wl]["toc_bytes"], bounds[wl]["data_bytes"],
                                                     bounds[wl]["image_bytes"], bounds[wl]["files"]) for wl in wls) + ".")
    out.append("Warm floor (create + run): " + "; ".join(
        "%s %.2f s" % (wl, warm[wl]["warm_create"] + warm[wl]["warm_run"]) for wl in wls) + ".\n")
    out.append("![cold start chart](bench-coldstart.png)\n")
    out.append("Raw runs: `.work/bench-cold/results.jsonl` (one JSON line per run).\n")
    md_section(md, "coldstart", "\n".join(out) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(nets), len(wls), figsize=(4 * len(wls), 3.2 * len(nets)), squeeze=False)
    colors = {"pull": "#4c72b0", "create": "#dd8452", "run": "#55a868"}
    for i, net in enumerate(nets):
        for j, wl in enumerate(wls):
            ax = axes[i][j]
            modes = [m for m in MODES if (net, wl, m) in med]
            bottom = [0.0] * len(modes)
            for part in ("pull", "create", "run"):
                vals = [med[(net, wl, m)][part] for m in modes]
                ax.bar(range(len(modes)), vals, bottom=bottom, color=colors[part], label=part)
                bottom = [a + b for a, b in zip(bottom, vals)]
            pb, _ = phys(net, wl)
            ax.axhline(pb, color="black", linestyle="--", linewidth=1, label="physical bound")
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels([m.replace("lazypull-prio", "lp-prio") for m in modes], fontsize=8)
            ax.set_title("%s, %s" % (wl, net), fontsize=9)
            ax.set_ylabel("seconds", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    if sys.argv[1] == "bound":
        bound(*sys.argv[2:6])
    elif sys.argv[1] == "report":
        report(*sys.argv[2:6])
    elif sys.argv[1] == "soci":
        soci(*sys.argv[2:5])
    else:
        raise SystemExit(__doc__)
