"""Run every speed comparison of the project in one go and print each as a ratio measured in this run.

    python benchmarks/run_all.py            # all benchmarks
    python benchmarks/run_all.py attacks    # only those whose file name contains "attacks"

Every ``benchmarks/bench_*.py`` is run (bench_attacks: PGD vs foolbox; bench_autoattack: AutoAttack vs
torchattacks, needs ``pip install --no-deps torchattacks==3.5.1``; bench_differential; bench_train).

Also prints the per-chapter runtimes recorded in results/<profile>/*.json by the last chapter runs.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str]) -> int:
    pattern = argv[0] if argv else ""
    scripts = sorted(p for p in HERE.glob("bench_*.py") if pattern in p.name)
    print(f"# marginlab benchmarks, {date.today()}, {_cpu()}, python {platform.python_version()}")
    failed = 0
    for script in scripts:
        print(f"\n## {script.name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], cwd=ROOT)
        failed += proc.returncode != 0
        print(f"({script.name}: {time.perf_counter() - start:.1f} s, exit {proc.returncode})", flush=True)
    for profile in ("quick", "full"):
        results = sorted((ROOT / "results" / profile).glob("*.json"))
        if results:
            print(f"\n## chapter runtimes recorded in results/{profile}/")
            for path in results:
                prov = json.loads(path.read_text()).get("provenance", {})
                print(f"{path.stem:32s} {prov.get('seconds', float('nan')):8.1f} s  on {prov.get('device_name', '?')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
