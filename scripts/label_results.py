"""Label the files under figures/<profile>/ that no recorded stage run made (they predate run stamps) in the folder's
manifest.json: the commit that last committed each file and its date, so no result stays unlabelled.

    .venv/bin/python scripts/label_results.py pretrained toy

Files a stage run wrote keep that run's entry; an entry is replaced when a stage writes the file again."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_commit(path: Path) -> tuple[str, str]:
    out = subprocess.run(["git", "log", "-1", "--follow", "--format=%h %cs", "--", str(path.relative_to(ROOT))],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return (out[0], out[1]) if out else (None, None)


def label(profile: str) -> int:
    d = ROOT / "figures" / profile
    f = d / "manifest.json"
    manifest = json.loads(f.read_text()) if f.exists() else {}
    added = 0
    for p in sorted(d.iterdir()):
        if p.name == "manifest.json" or p.name in manifest or not p.is_file():
            continue
        sha, day = last_commit(p)
        manifest[p.name] = {"stage": None, "profile": profile, "run_id": None, "commit": sha, "dirty": None,
                            "settings_hash": None, "finished": day,
                            "note": "made before stage runs were recorded: commit and date are those that "
                                    "committed the file, which may be later than the run that made it"}
        added += 1
    f.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return added


if __name__ == "__main__":
    for profile in sys.argv[1:] or ["pretrained"]:
        print(f"figures/{profile}: {label(profile)} files labelled")
