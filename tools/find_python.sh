#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or fails with a message.
# Order: $PYTHON, python3.13/python3.12 on PATH, pyenv's installed 3.12+, python3.
set -u
ok() {  # ok INTERPRETER: true when it runs and reports >= 3.12
  "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}
resolve() { "$@" -c 'import sys; print(sys.executable)'; }

if [ -n "${PYTHON:-}" ]; then
  ok "$PYTHON" && { resolve "$PYTHON"; exit 0; }
  echo "PYTHON=$PYTHON is not a working Python >= 3.12" >&2; exit 1
fi
for candidate in python3.12 python3.13; do
  ok "$candidate" && { resolve "$candidate"; exit 0; }
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -V); do
    candidate="$root/versions/$version/bin/python3"
    ok "$candidate" && { resolve "$candidate"; exit 0; }
  done
fi
ok python3 && { resolve python3; exit 0; }
echo "No Python >= 3.12 found; install one or run 'make PYTHON=/path/to/python3.12'" >&2
exit 1
