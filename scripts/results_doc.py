"""Render a `outlierfx bench ... --json` file as a Markdown table: python bench/to_markdown.py FILE"""

import json
import sys


def main(path: str) -> None:
    rows = json.load(open(path))["rows"]
    keys = [k for k in rows[0]["metrics"]]
    extra = [k for k in ("calibration_s",) if any(k in r["metrics"] for r in rows)]
    print("| recipe | bits | " + " | ".join(keys + extra) + " |")
    print("|---" * (2 + len(keys) + len(extra)) + "|")
    for r in rows:
        m = r["metrics"]
        cells = [f"{m[k]:.4f}" if m[k] < 1000 else f"{m[k]:.3g}" for k in keys]
        cells += [f"{m.get(k, ''):}" for k in extra]
        print(f"| {r['recipe']} | {r['bits']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
