"""Bad checkpoints, re-checked from the shell (review s23): one `layerfast` line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _fcn1x8_run(tmp: Path) -> Path:
    """tmp/ck: an fcn1x8 at τ = 0, 1 (for (1, 8, 8) digits)."""
    from layerfast.models import build_model

    ck = tmp / "ck"
    ck.mkdir()
    for epoch in (0, 1):
        torch.manual_seed(epoch)
        torch.save(build_model("fcn1x8", 10, (1, 8, 8))[0].state_dict(),
                   ck / f"epoch_{epoch:03d}.pt")
    return ck


def _layerfast(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "layerfast", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_sparse_tensor_is_refused_without_torchs_warning(tmp_path: Path) -> None:
    """A checkpoint holding a sparse tensor is refused (dense weights only), but torch's load
    first printed its own `UserWarning: Validating sparse tensor invariants ...` and the line of
    torch's source under it: three lines on stderr, two of them not layerfast's. Now only the
    refusal."""
    ck = _fcn1x8_run(tmp_path)
    sd = torch.load(ck / "epoch_001.pt", weights_only=True)
    key = next(k for k, v in sd.items() if v.dim() == 2)
    sd[key] = sd[key].to_sparse()
    torch.save(sd, ck / "epoch_001.pt")
    p = _layerfast("analyze", "--arch", "fcn1x8", "--ckpts", str(ck), "--data", "digits",
                   "--max-samples", "16", "--quiet", "--out", str(tmp_path / "out"),
                   cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("layerfast: error:"), p.stderr
    assert "sparse" in lines[0]
    assert not (tmp_path / "out").exists()
