"""The environment the suite runs in is the lock of tested versions (locks/main.txt,
docs/environments.md): every locked package that is installed has the locked version, so a
passing suite says which versions it passed on. A venv that drifted from the lock (a package
upgraded by hand, a fresh resolve without `-c locks/main.txt`) fails here with the packages named."""

import re
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "locks" / "main.txt"


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_package_exactly():
    pins = locked()
    assert {"torch", "transformers", "trl", "peft", "accelerate", "datasets"} <= pins.keys()
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.!]*", v) for v in pins.values()), "no ranges, no local labels"


def test_installed_packages_are_the_locked_versions():
    drifted = []
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # in the lock for another extra or platform
        if installed.split("+")[0] != version:
            drifted.append(f"{name} {installed} (locked {version})")
    assert not drifted, ("installed versions differ from locks/main.txt; reinstall with "
                         f"`make install` or move the lock (`make lock`): {', '.join(drifted)}")
