"""What `pip install` gives a user: the two console scripts, and a wheel carrying the .proto, type information,
the licence and the metadata."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from extractor.paths import PROJECT_ROOT


@pytest.mark.parametrize("command", ["extractor", "classifiers"])
def test_console_scripts_are_installed_and_answer_help(command):
    script = Path(sys.executable).parent / command
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith(f"usage: {command} ")
    assert f"  {command} " in run.stdout  # the examples use the console script too


def test_the_wheel_carries_the_proto_types_licence_and_metadata(tmp_path):
    # Built from a copy of what the wheel is made of, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(PROJECT_ROOT / name, source / name)
    for package in ("extractor", "classifiers", "protos"):
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("frozen_features-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {"protos/feature_service.proto", "protos/feature_service_pb2.pyi", "extractor/py.typed",
            "classifiers/py.typed", f"{info}/licenses/LICENSE", "extractor/models/shipped/vgg16/config.toml"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert "License-Expression: MIT" in metadata and "Classifier: Typing :: Typed" in metadata
    assert "Provides-Extra: ray" in metadata
    assert "extractor = extractor.cli:main" in entry_points and "classifiers = classifiers.cli:main" in entry_points
