"""The two renderings of a run, a terminal table and Markdown; the verdicts are bench/verdicts.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.verdicts import REPORTED, TARGETS, evaluate, stall_verdict  # noqa: F401

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) rows for both renderings."""
    r = results
    ev = results.get("targets", {})

    def verdict(key: str) -> str:
        e = ev.get(key, {})
        p = e.get("pass")
        if p is None:
            return "n/a" if e.get("na") else "-"
        return "PASS" if p else "FAIL"

    def target(key: str) -> str:
        return ev.get(key, {}).get("target", "")

    rg = r.get("replay_gbps") or {}
    tk = r.get("takeover_ms") or {}
    up = r.get("up_s") or {}
    out: list[tuple[str, str, str, str]] = []
    tr = r.get("takeover_replay_gbps") or {}
    if tr:
        lay = tr.get("layouts") or {}
        for name, label in (("raid4", "RAID-4, into the cache"), ("none", "flat, pwrite")):
            one = lay.get(name) or {}
            if one:
                out.append((f"takeover replay, real path ({label}): GB/s, ms for MB",
                            f"{_fmt(one.get('gbps'))}, {_fmt(one.get('ms'))} ms for "
                            f"{_fmt((one.get('log_bytes') or 0) / 1e6)} MB", "", ""))
        out += [
            (f"memcpy of the same {_fmt((tr.get('memcpy_bytes') or 0) / 1e6)} MB (GB/s)",
             _fmt(tr.get("memcpy_gbps")), "", ""),
            ("takeover replay, real path (GB/s)", _fmt(tr.get("gbps")),
             target("takeover_replay_gbps"), verdict("takeover_replay_gbps")),
            ("takeover replay, real path / memcpy", _fmt(tr.get("ratio_memcpy")),
             target("takeover_replay_vs_memcpy"), verdict("takeover_replay_vs_memcpy")),
        ]
    if rg:
        out += [
            ("replay kernel only, numba replay_region (GB/s)", _fmt(rg.get("numba")), "", ""),
            (f"replay kernel only, python (GB/s{', scaled' if rg.get('python_scaled') else ''})",
             _fmt(rg.get("python")), "", ""),
            (f"memcpy same size, {_fmt((rg.get('log_bytes') or 0) / 1e6)} MB (GB/s)",
             _fmt(rg.get("memcpy")), "", ""),
            ("  numba scan alone / apply alone (GB/s)",
             f"{_fmt(rg.get('scan_gbps'))} / {_fmt(rg.get('apply_gbps'))}", "", ""),
            ("replay kernel only: numba / memcpy", _fmt(rg.get("ratio_memcpy")), "reported", ""),
            ("replay kernel only: numba / python (same slice)", _fmt(rg.get("ratio_python")),
             target("replay_vs_python"), verdict("replay_vs_python")),
        ]
    if tk:
        fill = (tk.get("fill") or {}).get("min")
        rep = tk.get("replay") or {}
        out += [
            (f"takeover p50 (ms, n={tk.get('n')})", _fmt(tk.get("p50")), "", ""),
            (f"takeover p99 (ms, n={tk.get('n')})", _fmt(tk.get("p99")), target("takeover_p99"),
             verdict("takeover_p99")),
            ("failed takeover trials (recovered, excluded)", _fmt(tk.get("failed_trials")),
             target("takeover_failed_trials"), verdict("takeover_failed_trials")),
            ("NVLog fill at crash (min)", _fmt(fill), target("takeover_fill"),
             verdict("takeover_fill")),
            ("replayed records / MB (median)",
             f"{_fmt(rep.get('records_median'))} / "
             f"{_fmt((rep.get('bytes_median') or 0) / 1e6)}", "", ""),
        ]
        for k, v in (tk.get("stages_from_kill") or {}).items():
            out.append((f"  {k} (ms after kill, median)", _fmt(v), "", ""))
    if up:
        out += [
            ("up --nodes 4 cold (s)", _fmt(up.get("cold")), "", ""),
            ("up --nodes 4 warm (s)", _fmt(up.get("warm")), target("up_warm"), verdict("up_warm")),
        ]
    out += _new_rows(r, target, verdict)
    out += _storage_rows(r, target, verdict)
    base = r.get("baseline") or {}
    if base:
        out.append(("baseline memcpy 64 MiB (GB/s)", _fmt(base.get("memcpy_gbps")), "", ""))
    return out


def _new_rows(r: dict[str, Any], target: Any, verdict: Any) -> list[tuple[str, str, str, str]]:
    """Rows of bus_overhead, ha_modes, nbd_randwrite and failover_timeline."""
    out: list[tuple[str, str, str, str]] = []
    bo = r.get("bus_overhead") or {}
    if bo:
        vm, bare = bo.get("vmemu_rpc_us") or {}, bo.get("bare_zmq_us") or {}
        out += [
            (f"bus: vmemu RPC 4 KiB round trip p50 / p99 (us, n={bo.get('n')})",
             f"{_fmt(vm.get('p50'))} / {_fmt(vm.get('p99'))}", "", ""),
            ("bus: bare zmq REQ/REP p50 / p99 (us)",
             f"{_fmt(bare.get('p50'))} / {_fmt(bare.get('p99'))}", "", ""),
            ("bus: vmemu / bare p50 / p99",
             f"{_fmt(bo.get('ratio_p50'))} / {_fmt(bo.get('ratio_p99'))}", "", ""),
        ]
    ha = r.get("ha_modes") or {}
    if ha:
        for m, v in (ha.get("modes") or {}).items():
            out.append((f"ha {m}: IOPS, p50 / p99 (us)",
                        f"{_fmt(v.get('iops'))}, {_fmt(v.get('p50_us'))} / {_fmt(v.get('p99_us'))}",
                        "", ""))
            f = v.get("fio")
            if isinstance(f, dict):
                out.append((f"  fio over NBD, {m}: IOPS, p50 / p99 (us)",
                            f"{_fmt(f.get('iops'))}, {_fmt(f.get('p50_us'))} / "
                            f"{_fmt(f.get('p99_us'))}", "", ""))
        out += [("ha (native load, Python-bound): shm / mirror IOPS", _fmt(ha.get("ratio_shm_mirror")),
                 target("ha_shm_vs_mirror"), verdict("ha_shm_vs_mirror")),
                ("ha (native load, Python-bound): shm / none IOPS", _fmt(ha.get("ratio_shm_none")),
                 target("ha_shm_vs_none"), verdict("ha_shm_vs_none"))]
        if "fio_ratio_shm_mirror" in ha or "fio_ratio_shm_none" in ha:
            out += [("ha (fio over NBD): shm / mirror IOPS", _fmt(ha.get("fio_ratio_shm_mirror")),
                     target("ha_fio_shm_vs_mirror"), verdict("ha_fio_shm_vs_mirror")),
                    ("ha (fio over NBD): shm / none IOPS", _fmt(ha.get("fio_ratio_shm_none")),
                     target("ha_fio_shm_vs_none"), verdict("ha_fio_shm_vs_none"))]
        elif ha.get("fio"):
            out.append(("  fio over NBD", str(ha["fio"]), "", ""))
    nb = r.get("nbd_randwrite") or {}
    if nb:
        base = nb.get("nbdkit_memory") or {}
        if base:
            out.append(("nbd: nbdkit memory fio IOPS, p50 / p99 (us)",
                        f"{_fmt(base.get('iops'))}, {_fmt((base.get('clat_us') or {}).get('p50'))}"
                        f" / {_fmt((base.get('clat_us') or {}).get('p99'))}", "", ""))
        vm = nb.get("vmemu") or {}
        if vm:
            out.append(("nbd: vmemu LUN fio IOPS, p50 / p99 (us)",
                        f"{_fmt(vm.get('iops'))}, {_fmt((vm.get('clat_us') or {}).get('p50'))}"
                        f" / {_fmt((vm.get('clat_us') or {}).get('p99'))}", "", ""))
        out.append(("nbd: vmemu / nbdkit memory IOPS",
                    _fmt(nb.get("ratio")) if "skipped" not in nb else f"skipped: {nb['skipped']}",
                    target("nbd_vs_nbdkit"), verdict("nbd_vs_nbdkit")))
    ft = r.get("failover_timeline") or {}
    if ft:
        dip = ft.get("dip_ms") or {}
        st = ft.get("stages_ms") or {}
        io = ft.get("iops") or {}
        out += [
            ("failover: client IOPS before crash / on partner / after giveback",
             f"{_fmt(io.get('before_crash'))} / {_fmt(io.get('served_by_partner'))} / "
             f"{_fmt(io.get('after_giveback'))}", "", ""),
            ("failover: no-completion dip at crash / at giveback (ms)",
             f"{_fmt(dip.get('crash'))} / {_fmt(dip.get('giveback'))}", "", ""),
            ("failover: takeover first_request_served (ms after detection)",
             _fmt(st.get("first_request_served")), "", ""),
            ("failover: giveback started to done (ms)", _fmt(ft.get("giveback_ms")), "", ""),
        ]
    return out


def _storage_rows(r: dict[str, Any], target: Any, verdict: Any) -> list[tuple[str, str, str, str]]:
    """Rows of cp, raid_rebuild, nvlog_lz4 and fs_randwrite."""
    out: list[tuple[str, str, str, str]] = []
    ev = r.get("targets") or {}
    cp = r.get("cp_mbps") or {}
    if cp:
        out += [
            (f"CP: WAFL on RAID-4, {cp.get('mib')} MiB random 4k / seq write (MB/s)",
             f"{_fmt(cp.get('cp_mbps'))} / {_fmt(cp.get('baseline_seq_mbps'))}", "", ""),
            ("CP / sequential write", _fmt(cp.get("ratio")), target("cp_vs_seq"),
             verdict("cp_vs_seq")),
        ]
    rb = r.get("raid_rebuild_mbps") or {}
    if rb:
        out += [
            (f"RAID-4 rebuild, {_fmt(rb.get('mib'))} MiB member / seq write (MB/s)",
             f"{_fmt(rb.get('raid_rebuild_mbps'))} / {_fmt(rb.get('baseline_seq_mbps'))}", "", ""),
            ("RAID rebuild / sequential write", _fmt(rb.get("ratio")), "reported", ""),
        ]
    lz = r.get("nvlog_lz4") or {}
    if lz:
        out += [
            ("NVLog lz4: logical / stored payload bytes", _fmt(lz.get("ratio")),
             target("nvlog_lz4_ratio"), verdict("nvlog_lz4_ratio")),
            ("NVLog append lz4 / raw (MB/s), ratio",
             f"{_fmt(lz.get('mbps'))} / {_fmt(lz.get('raw_mbps'))}, "
             f"{_fmt(ev.get('nvlog_lz4_vs_raw', {}).get('value'))}",
             "reported", ""),
            ("NVLog replay to files lz4 / raw (MB/s)",
             f"{_fmt(lz.get('replay_mbps_lz4'))} / {_fmt(lz.get('replay_mbps_raw'))}", "", ""),
        ]
    fr = r.get("fs_randwrite_iops") or {}
    if fr:
        tool = fr.get("tool")
        out += [
            (f"fs randwrite ({tool}): storage OS IOPS, p50/p99/max us",
             f"{_fmt(fr.get('fs_iops'))}, {_fmt(fr.get('fs_p50_us'))} / "
             f"{_fmt(fr.get('fs_p99_us'))} / {_fmt(fr.get('fs_max_us'))}", "", ""),
            (f"fs randwrite ({tool}): flat LUN IOPS, p50/p99/max us",
             f"{_fmt(fr.get('flat_iops'))}, {_fmt(fr.get('flat_p50_us'))} / "
             f"{_fmt(fr.get('flat_p99_us'))} / {_fmt(fr.get('flat_max_us'))}", "", ""),
            ("fs randwrite: storage OS / flat LUN IOPS", _fmt(fr.get("ratio")), "reported", ""),
        ]
        for name, side in (("storage OS", fr.get("fs") or {}), ("flat", fr.get("flat") or {})):
            if not side:
                continue
            reasons = ", ".join(f"{k} {v}" for k, v in (side.get("cp_reasons") or {}).items())
            out.append((f"  {name}: CPs (reasons), max/median ms, max blocks",
                        f"{_fmt(side.get('cp_count'))} ({reasons or '-'}), "
                        f"{_fmt(side.get('cp_ms_max'))} / {_fmt(side.get('cp_ms_median'))}, "
                        f"{_fmt(side.get('cp_blocks_max'))}", "", ""))
            out.append((f"  {name}: cp_stalls (ms), log_full CP, longest gap ms (in a CP)",
                        f"{_fmt(side.get('cp_stalls'))} ({_fmt(side.get('cp_stall_ms'))}), "
                        f"{'yes' if side.get('nvlog_full') else 'no'}, "
                        f"{_fmt(side.get('gap_ms'))} ({_fmt(side.get('gap_in_cp_ms'))})", "", ""))
        ns = ev.get("cp_no_stall") or {}
        if ns:
            out.append(("  ingest / CP can absorb (MB/s)",
                        f"{_fmt(ns.get('ingest_mbps'))} / {_fmt(ns.get('absorb_mbps'))} "
                        f"({ns.get('absorb_from') or '-'})", "", ""))
            out.append((ns["label"], stall_text(ns), target("cp_no_stall"), verdict("cp_no_stall")))
    return out


def stall_text(ns: dict[str, Any]) -> str:
    """The stall verdict's figures in one cell, each failing check named."""
    c = ns.get("checks") or {}
    st, gap, p99 = c.get("stalls") or {}, c.get("gap_ms") or {}, c.get("p99_vs_flat") or {}
    text = (f"{_fmt(st.get('value'))} stalls, gap {_fmt(gap.get('value'))} ms, "
            f"p99 {_fmt(p99.get('value'))}x flat")
    if st.get("excused"):
        text += f"; stalls excused: {st['excused']}"
    if ns.get("failed"):
        text += f"; failed: {', '.join(ns['failed'])}"
    elif ns.get("pass") is None and ns.get("na"):
        text += f"; n/a: {ns['na']}"
    return text


def table(results: dict[str, Any]) -> str:
    head = ("figure", "value", "target", "")
    data = [head] + rows(results)
    w = [max(len(row[i]) for row in data) for i in range(4)]
    lines = []
    for i, row in enumerate(data):
        lines.append("  ".join(c.ljust(w[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    b = results.get("baseline") or {}
    lines = [
        "# vmemu benchmark",
        "",
        f"Run {results.get('started')} ({'quick' if results.get('quick') else 'full'}), "
        f"{results.get('duration_s')} s; git {git_text(b)}.",
        f"Machine: {b.get('cpu_model')}, {b.get('nproc')} CPUs, {b.get('mem_gib')} GiB, "
        f"kernel {b.get('kernel')}, Python {b.get('python')}, numba {b.get('numba')}, "
        f"numpy {b.get('numpy')}.",
        "",
        "| figure | value | target | verdict |",
        "| --- | ---: | --- | --- |",
    ]
    for f, v, t, ok in rows(results):
        lines.append(f"| {f.strip()} | {v} | {t} | {ok} |")
    rg = results.get("replay_gbps") or {}
    tk = results.get("takeover_ms") or {}
    notes = []
    tr = results.get("takeover_replay_gbps") or {}
    if tr.get("method"):
        notes.append(f"- Takeover replay, real path: {tr['method']}.")
    if rg.get("python_note"):
        notes.append(f"- Replay kernel: {rg.get('method')}. {rg.get('python_note')}.")
    if tk:
        notes.append(f"- Takeover: kill -9 of node1 (timestamp just before `crash`) to the first "
                     f"successful read on node1's identity; 2-node cluster, {tk.get('nvram_mb')} MiB "
                     f"NVRAM filled to {((tk.get('fill') or {}).get('median'))} of the log. "
                     f"Stages: {tk.get('stages_note')}. {tk.get('p99_note')}.")
    ft = results.get("failover_timeline") or {}
    if ft.get("png"):
        notes.append(f"- Failover timeline: {Path(ft['png']).name} (client IOPS through kill -9, "
                     f"takeover, restart, giveback) and {Path(ft.get('events_png', '')).name} "
                     f"(every event, vmemu.timeline); takeover stages (ms after detection): "
                     f"{ft.get('stages_ms')}.")
    ha = results.get("ha_modes") or {}
    if ha.get("method"):
        notes.append(f"- HA modes: {ha['method']}.")
    cp = results.get("cp_mbps") or {}
    if cp:
        notes.append(f"- CP: {cp.get('mib')} MiB of random 4 KiB blocks committed by one WAFL CP "
                     f"on RAID-4 (3+1 disk files), best of reps, {cp.get('cp_ms')} ms; MB/s of "
                     f"user data, so parity and metadata are the CP's overhead. Baseline: 1 MiB "
                     f"pwrites + fdatasync of the same bytes to the same files.")
    fr = results.get("fs_randwrite_iops") or {}
    if fr.get("method"):
        notes.append(f"- fs randwrite: {fr['method']}; tool {fr.get('tool')}. The longest "
                     f"no-completion gap is the client's view of a stall (fio's per-I/O log, "
                     f"aligned to the CP events by fio's job start).")
    if results.get("errors"):
        notes.append(f"- Errors: {results['errors']}")
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def git_text(baseline: dict[str, Any]) -> str:
    g = baseline.get("git") or {}
    return f"{g.get('rev')}{' (dirty)' if g.get('dirty') else ''}"


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / "latest.json"
    m = out_dir / "latest.md"
    for path, text in ((j, json.dumps(results, indent=2, sort_keys=False) + "\n"),
                       (m, markdown(results))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return j, m
