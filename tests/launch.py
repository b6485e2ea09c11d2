"""Running a test script on two CPU ranks under torchrun, for the integration tests: one way to
find torchrun, set the workers' environment and take them down on a timeout."""
import os
import shutil
import signal
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def torchrun_path():
    """torchrun next to this Python, or on PATH (None if neither)."""
    path = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return path if os.path.exists(path) else shutil.which("torchrun")


def run_torchrun(args, cwd, timeout: float = 300):
    """``torchrun *args`` in ``cwd`` with tests/ and the repository importable and one thread
    per rank: (return code, stdout, stderr); on a timeout the code is -1 and stderr ends with
    "timed out"."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [TESTS, os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]))
    # Its own session, so that a timeout takes torchrun's workers down with it.
    proc = subprocess.Popen([torchrun_path(), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return -1, stdout, stderr + "\ntimed out"
    return proc.returncode, stdout, stderr
