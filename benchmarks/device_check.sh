#!/usr/bin/env bash
# One-call GPU check of pyro-cpa on the workplace's device machine (issue 15): test suite on CUDA, then the quick
# benchmark on CUDA beside the same cases on the machine's CPU cores. Logs and JSON go to $OUT.
#
# PREPARE (here, once per checkout; needs PyPI; the wheels are never committed):
#   echo /.whl/ >> .git/info/exclude          # if not there yet
#   P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P \
#       -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
#   mkdir -p .whl/sdist && python3 -m pip download --no-deps --no-binary=:all: -d .whl/sdist \
#       pycddlib-standalone==3.0.0
#   du -sh .whl                                 # ~0.9 MB (limit of everything that travels: 64 MiB)
# pyro-ppl 1.9.2 needs numpy, opt_einsum, pyro-api, torch, tqdm: the machine's image has all but pyro-api (and
# pyro-ppl). pycddlib has no cp312 wheel on this PyPI; its sdist (cddlib's C sources + Cython, 90 KB) is built
# there with the image's Cython and setuptools (--no-build-isolation). If that build fails, the tests that need
# cdd (S >= 3 enumeration; the library imports cdd lazily, S <= 2 never does) are reported as SKIPPED by
# benchmarks/skip_without_cdd.py, and the benchmark's S=3 integral row says it was skipped.
#
# THE CALL (device tool `run`; one call, ~1-2 min start + <= 540 s; give_back afterwards unless rerunning at once):
#   command:   bash benchmarks/device_check.sh
#   carry:     [".whl"]
#   timeout_s: 560
#   (kind left out: an H100 or an H200 -- env.txt says which; compare timings only within one run.)
#
# READING THE OUTPUT (files come back under files_at; output_tail holds the summary lines):
#   env.txt      nvidia-smi, python/torch/CUDA versions, whether cdd was built (phase exit codes at the end).
#   setup.log    wheel install and the pycddlib build log.
#   pytest.log   PYRO_CPA_TEST_DEVICE=cuda run of the whole suite (xdist workers, per-test timeout); the
#                "short test summary info" lists every FAILED/ERROR test with its one-line reason, SKIPPED ones
#                are cpu_only tests (and cdd ones if the build failed). rc 124/130 = stopped at its time budget
#                (the summary so far is still printed: SIGINT).
#   junit.xml    the same per test, with durations (`grep -o 'testcase [^>]*time="[0-9.]*"'`).
#   bench.log    benchmarks/run.py --quick --device cuda --thread-counts 1 2 16 --keep-going: the table. Rows
#                whose baseline starts "same on CPU" are the issue's device-vs-CPU column: "vs baseline" =
#                CPU seconds / CUDA seconds (> 1: the GPU is faster), "max rel diff to CPU" must be <= 1e-10.
#                "threads" rows: the same case at 1, 2, 16 CPU threads and on cuda, ratios against 1 thread.
#                A section that raised prints its traceback and "FAILED"; the last lines list the sections.
#   bench.json   the same rows as JSON (device, failed_sections, rows).
# Budgets below (seconds) keep the whole script under ~520 s; each phase writes its log as it goes.
set -u
OUT=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT"
SETUP_BUDGET=${SETUP_BUDGET:-90}
TEST_BUDGET=${TEST_BUDGET:-250}
BENCH_BUDGET=${BENCH_BUDGET:-170}
TEST_WORKERS=${TEST_WORKERS:-12}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ENV="$OUT/env.txt"

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; uname -r; } >"$ENV"

# 1. wheels (pure Python) and pycddlib from its sdist, into /tmp/site
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install FAILED"; exit 1; }
  if ls .whl/sdist/pycddlib_standalone-*.tar.gz >/dev/null 2>&1; then
    timeout "$SETUP_BUDGET" python3 -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target /tmp/site .whl/sdist/pycddlib_standalone-*.tar.gz || echo "pycddlib build FAILED (tests needing it skip)"
  fi
} >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
python3 - >>"$ENV" 2>&1 <<'EOF'
import importlib.util, platform, torch, pyro
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "pyro", pyro.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
print("cdd importable:", importlib.util.find_spec("cdd") is not None)
EOF
cat "$ENV"

# 2. the suite on cuda (cpu_only tests skip by their marker; without cdd its tests skip by the plugin)
PLUGIN=""
python3 -c "import cdd" 2>/dev/null || PLUGIN="-p skip_without_cdd"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n $TEST_WORKERS"
TIMEOUT=""
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT="--timeout 120"
PYTHONPATH="$PYTHONPATH:$PWD/benchmarks" PYRO_CPA_TEST_DEVICE=cuda timeout -s INT -k 30 "$TEST_BUDGET" \
  python3 -m pytest -q -p no:cacheprovider $XDIST $PLUGIN $TIMEOUT -rfEs --maxfail 200 \
  --junitxml "$OUT/junit.xml" tests 2>&1 | tee "$OUT/pytest.log" | grep -E "^(FAILED|ERROR)|passed|failed|error" | tail -40
TEST_RC=${PIPESTATUS[0]}
echo "pytest rc $TEST_RC" | tee -a "$ENV"

# 3. the quick benchmark on cuda, beside the CPU (its last lines: table summary, sections, failures)
timeout -s INT -k 30 "$BENCH_BUDGET" python3 benchmarks/run.py --quick --device cuda --thread-counts 1 2 16 \
  --keep-going --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60
BENCH_RC=${PIPESTATUS[0]}
echo "benchmark rc $BENCH_RC" | tee -a "$ENV"
exit 0
