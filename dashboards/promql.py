"""The metric names a PromQL expression reads (enough of PromQL's lexer for our own queries).

``metric_names("sum by (le) (rate(switchboard_ttft_seconds_bucket{model=~\"$model\"}[5m]))")``
is ``{"switchboard_ttft_seconds_bucket"}``: string literals, label matchers, range / subquery
brackets, numbers, durations, keywords, function and aggregation names and the label lists of
``by`` / ``without`` / ``on`` / ``ignoring`` / ``group_left`` / ``group_right`` are skipped;
every other identifier is a metric name. Grafana's ``label_values(metric, label)`` variable
queries are understood too. Prometheus checks the syntax itself (``promtool`` and the query
API); this only has to find names.
"""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
        "unless", "offset", "atan2", "inf", "nan", "start", "end",
    }
)  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects (recording-rule names included)."""
    m = _LABEL_VALUES.match(expr)
    if m:
        expr = m.group(1)
    text = _STRING.sub(" ", expr)
    text = _BRACES.sub(" ", text)
    while True:  # subqueries nest brackets only through expressions, so peel repeatedly
        stripped = _BRACKETS.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _LABEL_LIST.sub(" ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = _NUMBER.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if word.lower() in _KEYWORDS or text[max(match.start() - 1, 0)] == "$":
            continue  # a keyword, or a Grafana variable ($model)
        names.add(word)
    return names
