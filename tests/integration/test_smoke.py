import subprocess

import pytest


@pytest.mark.clients
def test_nbdinfo_reports_export(server):
    out = subprocess.run(["nbdinfo", "--json", server.uri()], capture_output=True, text=True, check=True).stdout
    assert '"export-size": 67108864' in out
