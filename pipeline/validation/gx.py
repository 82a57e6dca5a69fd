"""Run Great Expectations (GX Core 1.x, ephemeral context, analytics off) on pandas frames and fail loudly.

GX never raises on a failed validation; `run_gate` does: GateError names each failed expectation and
shows example rows. Every gate writes metrics/gates/<name>.json (results) and <name>.md (summary).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


class GateError(RuntimeError):
    """A data gate failed; the message names the failed expectations with example rows."""


@dataclass
class Check:
    """One expectation: GX class name, kwargs, and the frame (name in `frames`) it runs on."""
    frame: str
    expectation: str
    kwargs: dict
    why: str = ""


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # lazy: seconds to import
    return gx


def _examples(df: pd.DataFrame, result: dict, n: int = 5) -> list[dict]:
    idx = result.get("partial_unexpected_index_list") or []
    rows = []
    for i in idx[:n]:
        key = i.get("index") if isinstance(i, dict) else i
        if key in df.index:
            rows.append({k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                         for k, v in df.loc[key].to_dict().items()})
    if not rows:
        rows = [{"value": str(v)} for v in (result.get("partial_unexpected_list") or [])[:n]]
    return rows


def run_gate(name: str, frames: dict[str, pd.DataFrame], checks: list[Check], out_dir: str | Path,
             raise_on_fail: bool = True) -> dict:
    gx = _gx()
    ctx = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    results = []
    for frame_name, df in frames.items():
        df = df.reset_index(drop=True)
        mine = [c for c in checks if c.frame == frame_name]
        if not mine:
            continue
        ds = ctx.data_sources.add_pandas(f"{name}-{frame_name}")
        batch_def = ds.add_dataframe_asset(name=frame_name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}-{frame_name}"))
        by_id = {}
        for c in mine:
            by_id[suite.add_expectation(getattr(gx.expectations, c.expectation)(**c.kwargs)).id] = c
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}-{frame_name}", data=batch_def,
                                                                   suite=suite))
        run = vd.run(batch_parameters={"dataframe": df}, result_format={"result_format": "SUMMARY"})
        for r in run.results:  # GX may reorder: match results to checks by expectation id
            c = by_id.get(r.expectation_config.id, Check(frame_name, "", {}))
            res = r.result or {}
            exc = (r.exception_info or {}).get("exception_message") if isinstance(r.exception_info, dict) else None
            results.append({
                "frame": frame_name, "expectation": r.expectation_config.type,
                "kwargs": {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
                "success": bool(r.success), "why": c.why,
                "unexpected_count": res.get("unexpected_count"),
                "observed_value": str(res.get("observed_value")) if "observed_value" in res else None,
                "examples": [] if r.success else _examples(df, res),
                "error": exc,
            })
    report = {"gate": name, "success": all(r["success"] for r in results),
              "evaluated": len(results), "failed": sum(not r["success"] for r in results), "results": results,
              "rows": {k: len(v) for k, v in frames.items()}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(summary_md(report))
    if raise_on_fail and not report["success"]:
        raise GateError(failure_message(report))
    return report


def _describe(r: dict) -> str:
    col = r["kwargs"].get("column") or r["kwargs"].get("column_list") or ""
    args = {k: v for k, v in r["kwargs"].items() if k not in ("column", "column_list")}
    return f"{r['expectation']}({col}{', ' if args else ''}{', '.join(f'{k}={v}' for k, v in args.items())})"


def failure_message(report: dict) -> str:
    lines = [f"gate '{report['gate']}' failed {report['failed']} of {report['evaluated']} expectations:"]
    for r in report["results"]:
        if r["success"]:
            continue
        what = f" [{r['why']}]" if r["why"] else ""
        obs = f", observed {r['observed_value']}" if r["observed_value"] not in (None, "None") else ""
        cnt = f", {r['unexpected_count']} unexpected" if r["unexpected_count"] else ""
        lines.append(f"  - {r['frame']}: {_describe(r)}{what}{cnt}{obs}")
        if r["error"]:
            lines.append(f"      error: {r['error']}")
        for ex in r["examples"]:
            lines.append(f"      e.g. {ex}")
    return "\n".join(lines)


def summary_md(report: dict) -> str:
    status = "PASSED" if report["success"] else "FAILED"
    lines = [f"# Gate `{report['gate']}`: {status}", "",
             f"{report['evaluated'] - report['failed']}/{report['evaluated']} expectations passed; rows: "
             + ", ".join(f"{k}={v}" for k, v in report["rows"].items()), "",
             "| frame | expectation | result | unexpected | why |", "|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['frame']} | `{_describe(r)}` | {'ok' if r['success'] else '**FAIL**'} | "
                     f"{r['unexpected_count'] or ''} | {r['why']} |")
    if not report["success"]:
        lines += ["", "## Failures", "", "```", failure_message(report), "```"]
    return "\n".join(lines) + "\n"
