"""The OpenMP wait policy the `proscale` command sets before torch loads (proscale/cpu_policy.py)."""
import os
import subprocess
import sys

import pytest

from proscale import cpu_policy


def test_sets_short_spin_when_user_chose_nothing():
    env = {}
    assert cpu_policy.configure(env, torch_loaded=False) == "set GOMP_SPINCOUNT=1000"
    assert env == {"GOMP_SPINCOUNT": "1000"}


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
            "finally:\n    print('POLICY', os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k not in cpu_policy.USER_KEYS and k != cpu_policy.POLICY_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "POLICY 1000" in out.stdout


def test_keep_freed_memory_removes_page_faults_of_repeated_large_temporaries():
    """In a fresh process: a loop of 40 MB temporaries faults its pages in on every iteration with
    glibc's defaults, and about never after keep_freed_memory()."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = ("import resource, sys\n"
            "from proscale import cpu_policy\n"
            "if sys.argv[1] == 'keep':\n    assert cpu_policy.keep_freed_memory()\n"
            "import torch\n"
            "x = torch.ones(10_000_000)\n"
            "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(10):\n    (x * 2).sum()\n"  # the heap settles in a few iterations
            "f0 = faults()\n"
            "for _ in range(10):\n    (x * 2).sum()\n"
            "print(faults() - f0)\n")
    counts = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["default"] > 10 * 9000  # ~9,800 pages of 4 KB per 40 MB temporary
    assert counts["keep"] < counts["default"] / 3  # usually 0; the heap occasionally shifts once


def test_configure_malloc_opt_out():
    assert "glibc defaults" in cpu_policy.configure_malloc({"PROSCALE_MALLOC": "default"})
    with pytest.raises(ValueError, match="PROSCALE_MALLOC"):
        cpu_policy.configure_malloc({"PROSCALE_MALLOC": "tcmalloc"})
