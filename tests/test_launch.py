"""launch/*.sh: valid bash (`bash -n`) and clean under shellcheck when it is installed; the
README documents the flags the scripts rely on."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))


def test_there_are_launch_scripts():
    assert {os.path.basename(s) for s in SCRIPTS} >= {"tpu_pod.sh", "gpu_slurm.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--severity=style", script], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_has_worked_examples_and_the_multihost_flag():
    text = open(os.path.join(ROOT, "launch", "README.md")).read()
    for needle in ("--multihost", "v4-32", "v5e-64", "8 x H100", "--config.remat_policy=",
                   "--config.mesh.fsdp=", "--config.batch_size=", "--config.mesh.dcn_data="):
        assert needle in text, needle
    # Every --config.<field> the README uses exists in the stage configs.
    import re
    import sys
    sys.path.insert(0, ROOT)
    from configs import common
    c = common.base_config("pretrain", "mistral_7b")
    for field in set(re.findall(r"--config\.([a-z_.]+)=", text)):
        node = c
        for part in field.split("."):
            assert part in node, f"launch/README.md uses --config.{field}, which is no field"
            node = node[part]
