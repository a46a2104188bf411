"""The lock: `python .ci/lock.py check` fails when an installed package is missing from constraints.txt or differs
from its pin; `python .ci/lock.py write` rewrites constraints.txt from the current (clean) environment."""
import re, sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
SKIP = {"pip", "trainlab"}  # the installer itself, and this package (installed editable)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict:
    out = {}
    for d in metadata.distributions():
        name = norm(d.metadata["Name"])
        if name not in SKIP:
            out[name] = d.version.split("+")[0]  # torch 2.13.0+cpu satisfies the pin torch==2.13.0
    return out


def pinned() -> dict:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, ver = line.split("==")
            pins[norm(name)] = ver.strip()
    return pins


def check() -> int:
    have, pins = installed(), pinned()
    missing = sorted(f"{n}=={v}" for n, v in have.items() if n not in pins)
    differ = sorted(f"{n}: installed {v}, pinned {pins[n]}" for n, v in have.items() if n in pins and pins[n] != v)
    for title, rows in (("installed but not in constraints.txt", missing), ("installed at another version", differ)):
        if rows:
            print(f"lock: {len(rows)} package(s) {title}:\n  " + "\n  ".join(rows))
    if missing or differ:
        print("lock: regenerate constraints.txt in a clean venv (see its header)")
        return 1
    print(f"lock: all {len(have)} installed packages match constraints.txt")
    return 0


def write() -> int:
    head = [l for l in LOCK.read_text().splitlines() if l.startswith("#")] if LOCK.exists() else []
    body = [f"{n}=={v}" for n, v in sorted(installed().items())]
    LOCK.write_text("\n".join(head + body) + "\n")
    print(f"lock: wrote {len(body)} pins to {LOCK}")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd not in ("check", "write"):
        sys.exit("usage: python .ci/lock.py [check|write]")
    sys.exit(check() if cmd == "check" else write())
