import importlib.metadata

import launch


def test_requirements_pin_torch_first_and_every_package():
    reqs = launch.read_requirements(launch.REPO / "requirements.txt")
    assert reqs[0] == "torch==2.13.0", "torch is pinned and listed first"
    assert all("==" in r for r in reqs), [r for r in reqs if "==" not in r]


def test_installed_check_compares_versions():
    have = importlib.metadata.version("pytest")
    assert launch._installed(f"pytest=={have}")
    assert launch._installed("pytest")
    assert not launch._installed("pytest==0.0.1")
    assert not launch._installed("no-such-package-atelier==1.0")


def test_every_requirement_is_satisfied_here():
    """What the tests run on is what requirements.txt pins (so launch.py installs nothing on this machine)."""
    for path in ("requirements.txt", "requirements-test.txt"):
        missing = [r for r in launch.read_requirements(launch.REPO / path) if not launch._installed(r)]
        assert missing == [], f"{path}: not installed at the pinned version: {missing}"
