"""Installs the top-level cli.py as t2r/cli.py in wheels (editable installs find it via t2r.__path__)."""

from pathlib import Path

from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file("cli.py", str(Path(self.build_lib) / "t2r" / "cli.py"))
