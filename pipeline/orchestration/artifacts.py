"""Prefect artifacts of a run: one table per Great Expectations gate (``metrics/gates/*.json``), one table
of the run's metrics (``metrics/**/*.json``) and the report (``reports/report.md``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

GATES_DIR = Path("metrics") / "gates"
METRICS_DIR = Path("metrics")
REPORT = Path("reports") / "report.md"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-") or "artifact"


def _gate_rows(data: Any) -> list[dict[str, Any]]:
    """Rows (expectation, column, success, details) from a gate JSON: GX's validation-result dict
    (``results[].expectation_config.type``) or a flat list of ``{expectation, success, ...}``."""
    items = data.get("results", data.get("expectations", [])) if isinstance(data, dict) else data
    rows = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        config = item.get("expectation_config") or {}
        kwargs = config.get("kwargs") or item.get("kwargs") or {}
        name = (item.get("expectation") or item.get("expectation_type") or item.get("type")
                or config.get("type") or config.get("expectation_type") or "?")
        result = item.get("result") if isinstance(item.get("result"), dict) else {}
        details = {k: result[k] for k in ("observed_value", "unexpected_count", "unexpected_percent",
                                          "partial_unexpected_list") if k in result}
        details.update({k: item[k] for k in ("observed", "message", "details", "examples") if k in item})
        rows.append({"expectation": str(name), "column": str(kwargs.get("column", item.get("column", ""))),
                     "success": bool(item.get("success", False)),
                     "details": json.dumps(details, default=str)[:300] if details else ""})
    return rows


def gate_failures(path: str | Path) -> list[str]:
    """'gate: expectation(column)' for every failed expectation of a gate JSON (the gate itself if none)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path.stem}: unreadable gate result ({exc})"]
    failed = [f"{path.stem}: {r['expectation']}" + (f"({r['column']})" if r["column"] else "")
              for r in _gate_rows(data) if not r["success"]]
    ok = data.get("success", not failed) if isinstance(data, dict) else not failed
    return failed or ([] if ok else [f"{path.stem}: gate reported success=false"])


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        if len(value) <= 8 and all(not isinstance(v, (dict, list)) for v in value):
            out[prefix] = json.dumps(value)
    elif isinstance(value, float) and not math.isfinite(value):
        out[prefix] = str(value)
    else:
        out[prefix] = value


def metric_rows(workspace: str | Path = ".", limit: int = 2000) -> list[dict[str, Any]]:
    """(file, metric, value) for every scalar in metrics/**/*.json except the gates."""
    root = Path(workspace)
    rows = []
    for path in sorted((root / METRICS_DIR).rglob("*.json")):
        rel = path.relative_to(root)
        if (root / GATES_DIR) in path.parents:
            continue
        try:
            flat: dict[str, Any] = {}
            _flatten("", json.loads(path.read_text()), flat)
        except (OSError, json.JSONDecodeError):
            continue
        rows += [{"file": str(rel), "metric": k, "value": v} for k, v in flat.items()]
    return rows[:limit]


def publish_artifacts(workspace: str | Path = ".") -> dict[str, Any]:
    """Gate tables, the metrics table and the report markdown; returns what was published."""
    root = Path(workspace)
    published: dict[str, Any] = {"gates": {}, "metrics": 0, "report": False}
    for path in sorted((root / GATES_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows = _gate_rows(data) or [{"expectation": "(gate)", "column": "",
                                     "success": bool(isinstance(data, dict) and data.get("success")),
                                     "details": ""}]
        failures = gate_failures(path)
        summary = root / GATES_DIR / f"{path.stem}.md"
        desc = f"Great Expectations gate `{path.stem}`: " + ("**FAILED** " + "; ".join(failures) if failures
                                                             else "passed")
        if summary.exists():
            desc += "\n\n" + summary.read_text()[:4000]
        create_table_artifact(rows, key=artifact_key("gate", path.stem), description=desc)
        published["gates"][path.stem] = failures
    rows = metric_rows(root)
    if rows:
        create_table_artifact(rows, key="run-metrics", description=f"metrics/**/*.json of {root.resolve()}")
        published["metrics"] = len(rows)
    if (root / REPORT).exists():
        create_markdown_artifact((root / REPORT).read_text(), key="report", description=str(REPORT))
        published["report"] = True
    return published
