"""The persistent thread pool: every index runs exactly once, work is shared, results do not
depend on the thread count."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from fusedformer import _C
from tests.conftest import kernel_config


@pytest.mark.parametrize("n, grain", [(1, 1), (7, 3), (1000, 10), (4097, 64)])
def test_every_index_runs_once(n, grain, threads):
    owner = _C._pool_trace(n, grain)
    assert len(owner) == n
    assert min(owner) >= 0, "an index ran twice (-2) or never (-1)"


def test_two_threads_share_the_work():
    if _C.available_cpus() < 2:
        pytest.skip("needs 2 CPUs")
    with kernel_config(threads=2):
        counts = collections.Counter(_C._pool_trace(2000, 10))
    assert len(counts) == 2, counts


def test_more_threads_than_cpus_is_fine():
    with kernel_config(threads=5):
        assert _C.num_threads() == 5
        assert min(_C._pool_trace(100, 1)) >= 0


def test_result_independent_of_thread_count(rng):
    x = rng.standard_normal(3_000_001).astype(np.float32)
    results = []
    for t in (1, 2, 3):
        with kernel_config(threads=t):
            results.append(_C.stream_sum(x))
    assert results[0] == results[1] == results[2]
    assert results[0] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5, abs=1e-2)


# Back-to-back small jobs, the decode pattern, under each way a worker can be found: asleep
# (spin 0), spinning (a long spin) and in between. In a subprocess with a timeout, so that a
# lost wake-up fails the test instead of hanging the suite.
_STRESS = """
from fusedformer import _C
_C.set_num_threads({threads})
_C._set_spin_us({spin})
for i in range(3000):
    n = 1 + i % 97
    owner = _C._pool_trace(n, 1 + i % 5)
    assert len(owner) == n and min(owner) >= 0, (i, owner)
print("ok")
"""


@pytest.mark.parametrize("spin", [0, 3, 100000])
@pytest.mark.parametrize("threads", [2, 3])
def test_many_short_jobs_spin_or_sleep(spin, threads):
    out = subprocess.run([sys.executable, "-c", _STRESS.format(spin=spin, threads=threads)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_env_sets_spin(rng):
    env = {**os.environ, "FUSEDFORMER_SPIN_US": "0"}
    code = "from fusedformer import _C; import numpy as np; print(_C.stream_sum(np.ones(1 << 22, np.float32)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 1 << 22


def test_set_spin_rejects_negative():
    with pytest.raises(ValueError, match=r"\[_set_spin_us\] us must be in \[0, 1000000\]"):
        _C._set_spin_us(-5)


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match=r"\[set_num_threads\]"):
        _C.set_num_threads(0)


def test_env_sets_pool_size():
    env = {**os.environ, "FUSEDFORMER_NUM_THREADS": "3"}
    out = subprocess.run(
        [sys.executable, "-c", "from fusedformer import _C; print(_C.num_threads())"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_default_pool_matches_available_cpus():
    env = {k: v for k, v in os.environ.items() if k != "FUSEDFORMER_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", "from fusedformer import _C; print(_C.num_threads(), _C.available_cpus())"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    threads, cpus = out.stdout.split()
    assert threads == cpus and int(cpus) >= 1


_OPENMP = """
import numpy as np, torch
import fusedformer as ff
from fusedformer import _C, reference
from fusedformer.quant import Affine, compress
rng = np.random.default_rng(0)
torch.ones(1 << 16).sum()  # torch's OpenMP team exists
assert _C.pool_backend() == "openmp", _C.pool_backend()
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 8, 77, 64), (2, 2, 300, 64), (2, 2, 300, 64)))
for threads in (1, 2, 3):
    _C.set_num_threads(threads)
    np.testing.assert_allclose(ff.sdpa(q, k, v, causal=True), reference.sdpa(q, k, v, causal=True), atol=2e-5)
    qw = compress((rng.standard_normal((96, 256)) * 0.05).astype(np.float32), Affine(4, 64))
    x = rng.standard_normal((5, 256)).astype(np.float32)
    np.testing.assert_allclose(ff.qmatmul(x, qw), reference.matmul_t(x, qw.dequantize()), rtol=1e-4, atol=1e-4)
    a = ff.sdpa(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), causal=True)
    np.testing.assert_array_equal(a.numpy(), ff.sdpa(q, k, v, causal=True))  # torch in, numpy in: same bits
print("ok")
"""


def test_env_runs_kernels_on_the_openmp_team():
    """FUSEDFORMER_POOL=openmp with torch's OpenMP runtime loaded: kernels run as its parallel
    regions, with any pool size, and match the float64 reference."""
    pytest.importorskip("torch")
    env = {**os.environ, "FUSEDFORMER_POOL": "openmp"}
    out = subprocess.run([sys.executable, "-c", _OPENMP], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


_THROWS = """
import sys
import numpy as np
pool, thrower, memory = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if pool == "openmp":
    import torch
    torch.ones(1 << 16).sum()  # torch's OpenMP team exists
from fusedformer import _C, reference
import fusedformer as ff
_C.set_num_threads(2)
assert _C.pool_backend() == pool, _C.pool_backend()
error = MemoryError if memory else RuntimeError
raised = 0
for attempt in range(30):  # (a worker of our pool may be asleep and miss a job; the team's join)
    try:
        ran = _C._pool_job_that_throws(400, thrower, memory)
        assert ran == 400, ran  # nobody threw: every range ran
    except error as e:
        raised += 1
        assert memory or "[_pool_job_that_throws] range" in str(e), e
        if raised == 3:
            break
assert raised == 3, raised
rng = np.random.default_rng(0)  # the pool lives on: both threads compute right
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 8, 77, 64), (1, 2, 300, 64), (1, 2, 300, 64)))
for _ in range(20):
    np.testing.assert_allclose(ff.sdpa(q, k, v, causal=True), reference.sdpa(q, k, v, causal=True), atol=2e-5)
print("ok")
"""


@pytest.mark.parametrize("pool", ["own", "openmp"])
@pytest.mark.parametrize("thrower", ["caller", "worker"])
@pytest.mark.parametrize("memory", [True, False], ids=["bad_alloc", "runtime_error"])
def test_an_exception_inside_a_job_fails_the_call_not_the_process(pool, thrower, memory):
    """A range that throws (a scratch buffer the system refuses: std::bad_alloc) on the calling
    thread or on a worker raises MemoryError / RuntimeError once every thread has left the job:
    a worker's throw terminated the process, the caller's left workers on its unwound frame."""
    if pool == "openmp":
        pytest.importorskip("torch")
    env = {**os.environ, "FUSEDFORMER_POOL": pool}
    out = subprocess.run([sys.executable, "-c", _THROWS, pool, thrower, "1" if memory else "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


_BACKEND = """
import os, sys
import numpy as np
from fusedformer import _C
before = _C.pool_backend()
import torch
torch.ones(1 << 16).sum()
print(_C._pool_mode(), before, _C.pool_backend())
"""


@pytest.mark.parametrize(
    "policy, backend",
    [(None, "openmp"), ("active", "openmp"), ("PASSIVE", "own"), ("passive", "own")],
)
def test_default_backend_follows_the_openmp_wait_policy(policy, backend):
    """FUSEDFORMER_POOL unset (auto): our pool until an OpenMP runtime is loaded; then its team
    where the team's threads spin between regions (OMP_WAIT_POLICY unset or active), our pool
    where they sleep (passive)."""
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDFORMER_POOL", "OMP_WAIT_POLICY")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", _BACKEND], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["auto", "own", backend]


def test_env_own_keeps_our_pool_with_torch_loaded():
    pytest.importorskip("torch")
    env = {**os.environ, "FUSEDFORMER_POOL": "own"}
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", _BACKEND], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["own", "own", "own"]


_FORK = """
import os, signal
import numpy as np, torch
import fusedformer as ff
from fusedformer import _C, reference
_C._set_pool("{pool}")
torch.ones(1 << 16).sum()
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, 300, 64)).astype(np.float32) for _ in range(3))
want = ff.sdpa(q, k, v, causal=True)  # the team (or pool) has run in the parent
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # a hung child dies instead of outliving the test
    ok = np.array_equal(ff.sdpa(q, k, v, causal=True), want) and _C.pool_backend() == "own"
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(status)  # 0: exited with the right result; 14 (SIGALRM): hung
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("pool", ["auto", "openmp", "own"])
def test_forked_child_runs_kernels(pool):
    """A child forked after kernels ran on the OpenMP team computes on our pool: GNU OpenMP's team
    does not survive a fork (its regions wait forever for the parent's threads there)."""
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", _FORK.format(pool=pool)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_set_pool_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"\[_set_pool\] name must be 'auto', 'own' or 'openmp'"):
        _C._set_pool("tbb")

_FORK_DURING_JOB = """
import os, sys, threading, time
import numpy as np
import fusedformer as ff
from fusedformer import _C
_C._set_pool("own")
_C.set_num_threads(2)
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 8, 200, 64)).astype(np.float32)
want = ff.sdpa(q, q, q, causal=True)
stop = False
def busy():  # a job of the parent's pool under way at each fork
    while not stop:
        ff.sdpa(q, q, q, causal=True)
worker = threading.Thread(target=busy)
worker.start()
status = []
for i in range(6):
    time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child: its own pool of the parent's size, resizable, same results
        # (its worker exists: it joins some job; a busy machine may let the caller finish a few alone)
        ok = _C.num_threads() == 2 and any(len(set(_C._pool_trace(2000, 10))) == 2 for _ in range(200))
        ok = ok and np.array_equal(ff.sdpa(q, q, q, causal=True), want)
        _C.set_num_threads(1)
        ok = ok and _C.num_threads() == 1 and np.array_equal(ff.sdpa(q, q, q, causal=True), want)
        os._exit(0 if ok else 3)
    for _ in range(500):  # 10 s
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status.append(os.waitstatus_to_exitcode(code))
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        status.append("hung")
stop = True
worker.join()
print(status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_children_get_a_pool_of_their_own():
    """A child forked while the parent's pool runs a job neither hangs (the parent's workers and
    locks are not its) nor runs alone: it builds a pool of the parent's size, which it can resize."""
    out = subprocess.run([sys.executable, "-c", _FORK_DURING_JOB], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == str([0] * 6), out.stdout


_GRANDCHILD = """
import os
from fusedformer import _C
_C.set_num_threads(1)  # before starting workers, as multiprocessing users do
pid = os.fork()
if pid == 0:  # a child that never used the pool forks again at once
    grand = os.fork()
    if grand == 0:
        os._exit(0 if _C.num_threads() == 1 else 3)
    _, status = os.waitpid(grand, 0)
    os._exit(os.waitstatus_to_exitcode(status))
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_grandchildren_keep_the_thread_count():
    out = subprocess.run([sys.executable, "-c", _GRANDCHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "0", (out.stdout, out.stderr)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS as Linux applies it")
def test_threads_the_system_refuses_raise():
    """A pool the system cannot start (its address space too small for the stacks) raises a named
    RuntimeError and keeps the pool in place, instead of hanging."""
    script = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
              "from fusedformer import _C\n"
              "try:\n    _C.set_num_threads(4096)\nexcept RuntimeError as e:\n    print(e)\n"
              "print(_C.num_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message, threads = out.stdout.strip().split("\n")
    assert message.startswith("[set_num_threads] the system refused to start 4096 threads") and threads == str(_C.num_threads())


_LOCKS_AT_FORK = """
import os, sys, threading, time
import numpy as np
import fusedformer as ff
from fusedformer import ops_attention
held = [ops_attention._OUTPUT_CACHE.lock]
if sys.argv[1] == "torch":
    from fusedformer.torch.routing import AttentionStats
    stats = AttentionStats()
    held.append(stats._lock)
go, done = threading.Event(), threading.Event()
def holder():  # another thread holds the locks at the fork
    for lock in held:
        lock.acquire()
    go.set()
    done.wait()
    for lock in held:
        lock.release()
threading.Thread(target=holder, daemon=True).start()
go.wait()
pid = os.fork()
if pid == 0:
    q = np.ones((1, 16, 2048, 64), np.float32)  # an 8 MiB output: from the output cache
    out = ff.sdpa(q, q[:, :, :64], q[:, :, :64])
    if sys.argv[1] == "torch":
        stats.record(None)
    os._exit(0 if out.shape == q.shape else 1)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        print("exit", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("hung")
done.set()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("frameworks", ["numpy", "torch"])
def test_locks_held_by_another_thread_at_a_fork_are_free_in_the_child(frameworks):
    """The output cache's lock (and the attention stats' with torch) held by another thread when
    the process forks: the child's first large output and counted call do not wait forever."""
    if frameworks == "torch":
        pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", _LOCKS_AT_FORK, frameworks], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "exit 0"


_AT_SHUTDOWN = """
import numpy as np, fusedformer as ff
small = np.random.rand(1, 4, 64, 64).astype(np.float32)
big = np.random.rand(1, 16, 2048, 64).astype(np.float32)  # an 8 MiB output: the output cache
qw = ff.quant.compress(np.random.rand(256, 256).astype(np.float32), ff.quant.Affine(bits=4, group_size=64))
calls = {"sdpa": lambda: ff.sdpa(small, small, small), "sdpa 8 MiB": lambda: ff.sdpa(big, small, small),
         "sdpa mask": lambda: ff.sdpa(small, small, small, mask=np.ones((64, 64), np.float64)),
         "qmatmul": lambda: ff.qmatmul(np.ones((8, 256), np.float32), qw)}
class Flush:  # a module-level object whose __del__ runs at interpreter shutdown
    def __del__(self):
        for name, fn in calls.items():
            try:
                fn()
                print(name, "ok")
            except Exception as e:
                print(name, "failed:", type(e).__name__, e)
flusher = Flush()
"""


def test_calls_from_a_finalizer_at_interpreter_shutdown():
    """Calls from a __del__ that runs while the interpreter shuts down (the import machinery
    gone): nothing the calls need is imported inside them."""
    out = subprocess.run([sys.executable, "-c", _AT_SHUTDOWN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:4] == ["sdpa ok", "sdpa 8 MiB ok", "sdpa mask ok", "qmatmul ok"], out.stdout
