"""The chaos campaign's record and judge: histories of block reads and writes, one JSON object a
line in Jepsen's shape (history.py), and a per-block linearizability checker (checker.py: a
Wing-Gong search in wgl.py) that names lost, phantom and stale reads (anomalies.py) in a verdict
(verdict.py). docs/chaos.md has the format and what a verdict proves."""
