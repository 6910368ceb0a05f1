"""Print the project's requirements: the base (serving) ones, then those of each extra named."""

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
project = tomllib.loads(PYPROJECT.read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
sys.stdout.write("".join(f"{r}\n" for r in requirements))
