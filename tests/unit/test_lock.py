"""constraints.txt pins every dependency pyproject.toml names, at a version its specifier allows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [line for lines in project["optional-dependencies"].values() for line in lines]
    return [Requirement(line) for line in [*project["dependencies"], *extras]]


def pin_markers() -> dict[str, str]:
    """Each pin's environment marker ("" for a pin that applies everywhere)."""
    markers: dict[str, str] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        pin, _, marker = raw.partition(";")
        if "==" in pin and not pin.lstrip().startswith("#"):
            markers[canonicalize_name(pin.partition("==")[0].strip())] = marker.strip()
    return markers


def pinned_versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split(";")[0].strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_declared_dependency_is_pinned_within_its_specifier() -> None:
    pins = pinned_versions()
    stale = [
        str(req)
        for req in declared_requirements()
        if canonicalize_name(req.name) not in pins
        or not req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True)
    ]
    assert not stale, f"constraints.txt misses or contradicts {stale}: run scripts/lock"


def test_every_pin_is_exact() -> None:
    assert all(version for version in pinned_versions().values())


def test_a_dependency_declared_for_every_platform_is_pinned_for_every_platform() -> None:
    markers = pin_markers()
    narrowed = [
        f"{req.name}: {markers[canonicalize_name(req.name)]}"
        for req in declared_requirements()
        if req.marker is None and markers.get(canonicalize_name(req.name))
    ]
    assert not narrowed, f"pinned only for some platforms: {narrowed}: run scripts/lock"


def test_tzdata_is_a_dependency_so_zones_resolve_without_an_os_zone_database() -> None:
    names = {canonicalize_name(req.name) for req in declared_requirements()}
    assert "tzdata" in names
    assert pin_markers()["tzdata"] == ""
