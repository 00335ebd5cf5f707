"""scripts/quickstart.sh end to end (slow: 300 training steps on 2 processes): its model has no dead head."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_model_has_every_head_alive(tmp_path):
    run_dir = tmp_path / "quickstart"
    env = {**os.environ, "NVIUM_SKIP_SETUP": "1", "RUN_DIR": str(run_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=3600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["dead_heads"] == [] and max(result["head_perplexity"]) < 2048, result["head_perplexity"]
    assert "every head alive" in out.stderr
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert ". .venv/bin/activate" in out.stdout  # the tools need the environment the script installed
