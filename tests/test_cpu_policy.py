"""The OpenMP wait policy the `proscale` command sets before torch loads (proscale/cpu_policy.py)."""
import os
import subprocess
import sys

import pytest

from proscale import cpu_policy


def test_sets_passive_when_user_chose_nothing():
    env = {}
    assert cpu_policy.configure(env, torch_loaded=False) == "set PASSIVE"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize("key,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000")])
def test_user_setting_kept(key, value):
    env = {key: value}
    assert cpu_policy.configure(env, torch_loaded=False).startswith("kept user setting")
    assert env == {key: value}


def test_opt_out_and_too_late():
    env = {"PROSCALE_OMP_POLICY": "torch"}
    assert "torch defaults" in cpu_policy.configure(env, torch_loaded=False) and "OMP_WAIT_POLICY" not in env
    env = {}
    assert cpu_policy.configure(env, torch_loaded=True).startswith("too late") and env == {}
    with pytest.raises(ValueError, match="PROSCALE_OMP_POLICY"):
        cpu_policy.configure({"PROSCALE_OMP_POLICY": "spin"}, torch_loaded=False)


def test_command_sets_it_before_torch_loads():
    """In a fresh `python -m proscale` the policy is in the environment by the time a command runs
    (torch, and with it libgomp, loads after cli.main configured it)."""
    code = ("import sys, os\n"
            "assert 'torch' not in sys.modules\n"
            "from proscale import cli\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    cli.main(['flops', '--preset', 'm2f_tiny', '--size', '64x64', '--json'])\n"
            "finally:\n    print('POLICY', os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k not in cpu_policy.USER_KEYS and k != cpu_policy.POLICY_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "POLICY PASSIVE" in out.stdout
