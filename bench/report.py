"""Targets, pass/fail, and the two renderings of a run: a terminal table and Markdown."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# (key, label, how to get the figure, comparison, target, unit)
TARGETS: list[tuple[str, str, tuple[str, ...], str, float, str]] = [
    ("replay_vs_memcpy", "replay numba / memcpy", ("replay_gbps", "ratio_memcpy"), ">=", 0.3, "x"),
    ("replay_vs_python", "replay numba / python", ("replay_gbps", "ratio_python"), ">=", 50.0, "x"),
    ("takeover_p99", "takeover p99", ("takeover_ms", "p99"), "<", 200.0, "ms"),
    ("up_warm", "up --nodes 4, warm", ("up_s", "warm"), "<", 3.0, "s"),
    ("ha_shm_vs_mirror", "ha: shm / mirror IOPS", ("ha_modes", "ratio_shm_mirror"), ">=", 2.0, "x"),
    ("ha_shm_vs_none", "ha: shm / none IOPS", ("ha_modes", "ratio_shm_none"), ">=", 3.0, "x"),
    # The job: fio 4k randwrite qd16 over NBD, the same in every mode.
    ("ha_fio_shm_vs_mirror", "ha fio: shm / mirror IOPS", ("ha_modes", "fio_ratio_shm_mirror"), ">=",
     2.0, "x"),
    ("ha_fio_shm_vs_none", "ha fio: shm / none IOPS", ("ha_modes", "fio_ratio_shm_none"), ">=", 3.0,
     "x"),
    ("nbd_vs_nbdkit", "NBD: vmemu / nbdkit memory IOPS", ("nbd_randwrite", "ratio"), ">=", 0.25,
     "x"),
]


def _get(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = results
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, label, path, op, target, unit in TARGETS:
        v = _get(results, path)
        ok = None if v is None else (v >= target if op == ">=" else v < target)
        out[key] = {"label": label, "value": v, "target": f"{op} {target:g} {unit}".strip(),
                    "pass": ok}
    return out


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
        p = ev.get(key, {}).get("pass")
        return "-" if p is None else ("PASS" if p else "FAIL")

    def target(key: str) -> str:
        return ev.get(key, {}).get("target", "")

    rg = r.get("replay_gbps") or {}
    tk = r.get("takeover_ms") or {}
    up = r.get("up_s") or {}
    out: list[tuple[str, str, str, str]] = []
    if rg:
        out += [
            ("replay numba (GB/s)", _fmt(rg.get("numba")), "", ""),
            (f"replay python (GB/s{', scaled' if rg.get('python_scaled') else ''})",
             _fmt(rg.get("python")), "", ""),
            ("memcpy same size (GB/s)", _fmt(rg.get("memcpy")), "", ""),
            ("  numba scan alone / apply alone (GB/s)",
             f"{_fmt(rg.get('scan_gbps'))} / {_fmt(rg.get('apply_gbps'))}", "", ""),
            ("numba / memcpy", _fmt(rg.get("ratio_memcpy")), target("replay_vs_memcpy"),
             verdict("replay_vs_memcpy")),
            ("numba / python", _fmt(rg.get("ratio_python")), target("replay_vs_python"),
             verdict("replay_vs_python")),
        ]
    if tk:
        fill = (tk.get("fill") or {}).get("min")
        rep = tk.get("replay") or {}
        out += [
            (f"takeover p50 (ms, n={tk.get('n')})", _fmt(tk.get("p50")), "", ""),
            (f"takeover p99 (ms, n={tk.get('n')})", _fmt(tk.get("p99")), target("takeover_p99"),
             verdict("takeover_p99")),
            ("failed takeover trials (recovered, excluded)", _fmt(tk.get("failed_trials")),
             "0", "-" if tk.get("failed_trials") is None else
             ("PASS" if tk.get("failed_trials") == 0 else "FAIL")),
            ("NVLog fill at crash (min)", _fmt(fill), ">= 0.45", "-" if fill is None else
             ("PASS" if fill >= 0.45 else "FAIL")),
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
        if "fio_ratio_shm_mirror" in ha:
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
        f"{results.get('duration_s')} s; git {((b.get('git') or {}).get('rev'))}"
        f"{' (dirty)' if (b.get('git') or {}).get('dirty') else ''}.",
        f"Machine: {b.get('cpu_model')}, {b.get('nproc')} CPUs, {b.get('mem_gib')} GiB, "
        f"Python {b.get('python')}, numba {b.get('numba')}, numpy {b.get('numpy')}.",
        "",
        "| figure | value | target | verdict |",
        "| --- | ---: | --- | --- |",
    ]
    for f, v, t, ok in rows(results):
        lines.append(f"| {f.strip()} | {v} | {t} | {ok} |")
    rg = results.get("replay_gbps") or {}
    tk = results.get("takeover_ms") or {}
    notes = []
    if rg.get("python_note"):
        notes.append(f"- Replay: {rg.get('method')}. {rg.get('python_note')}.")
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
    if results.get("errors"):
        notes.append(f"- Errors: {results['errors']}")
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


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
