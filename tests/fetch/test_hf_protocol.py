"""huggingface_hub's own client downloads from the loopback HF server: it speaks the real protocol."""
from __future__ import annotations

import subprocess
import sys

from .conftest import same_files


def test_huggingface_hub_snapshot_download_against_the_test_server(hf_server, store, tmp_path):
    code = ("import sys\nfrom huggingface_hub import snapshot_download\n"
            "p = snapshot_download('zai-org/chatglm2-6b', revision='main', endpoint=sys.argv[1], "
            "local_dir=sys.argv[2], token=False)\nprint(p)\n")
    env = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-c", code, hf_server.url, str(tmp_path / "snap")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert same_files(tmp_path / "snap", store.files)
    assert any(r["server"] == "cdn" for r in store.requests)  # it followed the redirect to the CDN
