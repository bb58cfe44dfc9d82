#!/usr/bin/env bash
# Mutation testing with mutmut (configured under [tool.mutmut] in pyproject.toml); outside CI: it takes hours.
#
#   tools/mutation.sh                 # every module of anima_core/training, anima_core/data and plugins
#   tools/mutation.sh 'anima_core/training/step.py' 'anima_plugins/lora/*'   # only these (mutmut globs)
#   TESTS="tests/test_flow.py tests/test_option_effects.py" tools/mutation.sh ...  # a quicker test selection
#   TESTS_FROM=0c54742 tools/mutation.sh ...   # today's code against the tests of an older commit (before/after)
#
# mutmut mutates files under their import names, and the built-in plugins import as `anima_plugins` from
# the folder plugins/. So the run happens in a scratch copy of the committed tree where plugins/ is laid
# out as anima_plugins/; the checkout itself is never touched. Survivors are listed at the end, and the
# scratch copy is kept (its path is printed) for `mutmut show NAME`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/anima-mutation.XXXXXX")"
git -C "$repo" archive HEAD | tar -x -C "$scratch"
mv "$scratch/plugins" "$scratch/anima_plugins"
if [ -n "${TESTS_FROM:-}" ]; then
  rm -r "$scratch/tests"
  git -C "$repo" archive "$TESTS_FROM" tests | tar -x -C "$scratch"
fi
cd "$scratch"
# Narrow only_mutate to the given globs and the tests to $TESTS; the rest stays as pyproject.toml has it.
"$python" - "$@" <<'PY'
import json, os, re, sys
text = open("pyproject.toml").read()
if sys.argv[1:]:
    text = re.sub(r"(?m)^only_mutate = \[.*?\]", "only_mutate = " + json.dumps(sys.argv[1:]), text)
if os.environ.get("TESTS"):
    tests = json.dumps([t for t in os.environ["TESTS"].split() if os.path.exists(t)])  # older tests may lack some
    text = re.sub(r"(?m)^pytest_add_cli_args_test_selection = \[.*?\]", "pytest_add_cli_args_test_selection = " + tests, text)
open("pyproject.toml", "w").write(text)
PY
export OMP_NUM_THREADS=1
"$python" -m mutmut run || true
"$python" -m mutmut results --all true > results.txt || true
killed=$(grep -c ': killed' results.txt || true)
survived=$(grep -c ': survived' results.txt || true)
echo "killed $killed, survived $survived (results: $scratch/results.txt)"
grep ': survived' results.txt || true
