"""The services' console scripts without the ``services`` extra: one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Runs a console script's function with ``cattrs`` (part of the extra) made unimportable.
WITHOUT_CATTRS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cattrs":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from visiona_services import cli
sys.exit(getattr(cli, sys.argv[1])())
"""


@pytest.mark.parametrize(
    ("function", "prog"),
    [("remote_proxy", "visiona-remote-proxy"), ("api_server", "visiona-api-server")],
)
def test_a_service_without_its_extra_says_so_in_one_line(function: str, prog: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_CATTRS, function],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"{prog}: the services extra is not installed (cattrs is missing): "
        "pip install 'visiona-tunnel[services]'"
    ]
